#!/usr/bin/env python3
"""A real nginx and PHP-FPM with OPcache for the local world, serving a
node's DEST, and clients that record what each visitor got. The server
uses the shipped recipe (infra/web/nginx-php-fpm.conf, or --recipe
nginx-static.conf without PHP: only its lines marked `fleetsync:` are
replaced) and OPcache settings (infra/web/php-opcache.ini).

    web.py serve --dir DIR --root WEBROOT          # prints "ready PORT"; runs until stdin closes
    web.py visit --url URL --clients N --out FILE  # until stdin closes: one JSON line per response
    web.py balance --dir DIR --upstream HOST:PORT... [--recipe FILE]  # a load balancer; prints "ready PORT"
    web.py browse --url URL --clients N --out FILE # until stdin closes: one JSON line per page and its assets

`serve` listens on 127.0.0.1 (a free port) and runs PHP-FPM on a Unix
socket in DIR; both are stopped when stdin closes or on SIGTERM. nginx runs
as root (its workers too: the test's trees are under private temporary
directories), PHP-FPM with -R.

`visit` runs N clients, each requesting URL in a loop over one kept-alive
connection (a new one after an error), and writes per response:
{"start": epoch s, "end": epoch s, "status": HTTP status or 0 for a
transport error, "ids": the distinct release ids the page named, "error"}.
A page names ids as `release=ID` words.

`balance` is an nginx load balancer in front of the nodes' servers, as an
ALB with target-group stickiness is: each visitor (a `visitor` cookie)
stays on one node, the visitors spread over all of them. With `--recipe
nginx-balancer.conf` it is that shipped recipe instead: round robin, a
hashed asset one node answers 404 asked of the next.

`browse` runs N clients that each, in a loop, are a new visitor: load URL,
wait --think seconds (a browser fetching a lazily loaded chunk, or a tab
left open), then request every `src="/..."` or `href="/..."` asset the
page named, all with the visitor's cookie. Per page:
{"start", "status", "ids", "assets": {"/path": HTTP status}}.
"""
import argparse
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(HERE, "..", "web")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def php_fpm():
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    if not found:
        sys.exit("web.py: no php-fpm in /usr/sbin (infra/local/lib.sh installs the php-fpm package)")
    return found[-1]


def nginx_conf(d, name, workers, http):
    """Writes d/NAME.conf: an nginx run as root from the test's private
    directory d (its pid, logs and temporary files there), with `http` in
    its http block; returns its path."""
    conf = os.path.join(d, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""user root;
worker_processes {workers};
pid {d}/{name}.pid;
error_log {d}/{name}-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    fastcgi_temp_path {d}/fastcgi;
    proxy_temp_path {d}/proxy;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}
}}
""")
    return conf


def serve(a):
    os.makedirs(a.dir, exist_ok=True)
    port = free_port()
    sock = os.path.join(a.dir, "php-fpm.sock")
    recipe = open(os.path.join(RECIPES, a.recipe)).read()
    web, php = (apache if a.recipe.startswith("apache") else nginx)(a, recipe, port, sock)
    # Both die with this process, however it ends (a test killed mid-run
    # must not leave servers behind).
    servers = [php_fpm_server(a, sock)] if php else []
    servers.append(subprocess.Popen(web, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent))
    run(servers, lambda: (os.path.exists(sock) or not php) and port_open(port), port, f"the web server or php-fpm (see {a.dir})")


def nginx(a, recipe, port, sock):
    """nginx with an infra/web/nginx-*.conf recipe: its command line, and
    whether it needs PHP-FPM."""
    php = "fastcgi_pass" in recipe
    server, n = re.subn(r"^(\s*)listen .*# fleetsync: listen$", rf"\1listen 127.0.0.1:{port};", recipe, flags=re.M)
    server, m = re.subn(r"^(\s*)root .*# fleetsync: root$", rf"\1root {a.root};", server, flags=re.M)
    server, k = re.subn(r"^(\s*)fastcgi_pass .*# fleetsync: fastcgi_pass$", rf"\1fastcgi_pass unix:{sock};", server, flags=re.M)
    if (n, m, k) != (1, 1, int(php)):
        sys.exit(f"web.py: infra/web/{a.recipe} lost a line marked `fleetsync:` (listen, root, fastcgi_pass)")
    shutil.copy("/etc/nginx/fastcgi_params", os.path.join(a.dir, "fastcgi_params"))
    shutil.copy("/etc/nginx/mime.types", os.path.join(a.dir, "mime.types"))
    conf = nginx_conf(a.dir, "nginx", 2, f"""    include mime.types;
    keepalive_requests 100000;
{server}""")
    return ["nginx", "-c", conf, "-g", "daemon off;"], php


def apache(a, recipe, port, sock):
    """Apache with infra/web/apache-php-fpm.conf, the line after each
    `# fleetsync:` mark replaced: the live release's file is DIR/live.conf
    (what the recipe's after-switch command writes), DEST/releases is
    --root. Its workers run as www-data (Apache serves nothing as root):
    the test makes DEST readable to them."""
    marks = {
        "live": f"IncludeOptional {a.dir}/live.conf",
        "listen": f"<VirtualHost 127.0.0.1:{port}>",
        "releases": f"<Directory {a.root}>",
        "fastcgi": f'SetHandler "proxy:unix:{sock}|fcgi://localhost"',
    }
    lines, done = recipe.split("\n"), set()
    for i, line in enumerate(lines[:-1]):
        mark = re.match(r"^(\s*)# fleetsync: (\w+)$", line)
        if mark and mark.group(2) in marks:
            lines[i + 1] = mark.group(1) + marks[mark.group(2)]
            done.add(mark.group(2))
    if done != set(marks):
        sys.exit(f"web.py: infra/web/{a.recipe} lost a `# fleetsync:` mark ({', '.join(sorted(set(marks) - done))})")
    with open(os.path.join(a.dir, "site.conf"), "w") as f:
        f.write("\n".join(lines))
    modules = "\n".join(
        f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so" for m in ["mpm_event", "authz_core", "dir", "mime", "proxy", "proxy_fcgi"]
    )
    conf = os.path.join(a.dir, "apache.conf")
    with open(conf, "w") as f:
        f.write(f"""ServerName localhost
ServerRoot {a.dir}
DefaultRuntimeDir {a.dir}
PidFile {a.dir}/apache.pid
ErrorLog {a.dir}/apache-error.log
Mutex file:{a.dir}
Listen 127.0.0.1:{port}
User www-data
Group www-data
{modules}
TypesConfig /etc/mime.types
Include {a.dir}/site.conf
""")
    return ["apache2", "-f", conf, "-DFOREGROUND"], True


def php_fpm_server(a, sock):
    """PHP-FPM on a Unix socket (any local user may connect: Apache's
    workers are not root) with the shipped OPcache settings."""
    opcache = []
    for line in open(os.path.join(RECIPES, "php-opcache.ini")):
        line = line.split(";", 1)[0].strip()
        if line:
            key, value = (p.strip() for p in line.split("=", 1))
            opcache.append(f"php_admin_value[{key}] = {value}")
    fpm_conf = os.path.join(a.dir, "php-fpm.conf")
    with open(fpm_conf, "w") as f:
        f.write(f"""[global]
pid = {a.dir}/php-fpm.pid
error_log = {a.dir}/php-fpm.log
daemonize = no
[www]
user = root
group = root
listen = {sock}
listen.mode = 0666
pm = static
pm.max_children = {a.children}
catch_workers_output = yes
{chr(10).join(opcache)}
""")
    return subprocess.Popen([php_fpm(), "-F", "-R", "-y", fpm_conf], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def run(servers, ready, port, what):
    """Prints "ready PORT" once `ready()` holds, then runs until stdin
    closes (the test ended or died) or SIGTERM, and stops `servers`
    however it ends."""

    def stop(*_, code=0):
        for p in servers:
            if p.poll() is None:
                p.terminate()
        for p in servers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        os._exit(code)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.time() + 30
    while not ready():
        if time.time() > deadline or any(p.poll() is not None for p in servers):
            print(f"web.py: {what} did not start", file=sys.stderr)
            stop(code=1)
        time.sleep(0.05)
    print(f"ready {port}", flush=True)
    sys.stdin.read()
    stop()


def die_with_parent():
    """In a child, before exec: SIGTERM when web.py dies (prctl
    PR_SET_PDEATHSIG)."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


IDS = re.compile(rb"release=([A-Za-z0-9._-]+)")


def visit(a):
    u = urllib.parse.urlsplit(a.url)
    path = u.path or "/"
    out = open(a.out, "a", buffering=1)
    lock = threading.Lock()
    stopping = threading.Event()

    def client():
        conn = None
        while not stopping.is_set():
            start = time.time()
            status, ids, error = 0, [], None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                status = r.status
                ids = sorted({m.decode() for m in IDS.findall(body)})
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            line = json.dumps({"start": start, "end": time.time(), "status": status, "ids": ids, "error": error})
            with lock:
                out.write(line + "\n")

    clients(client, a.clients, stopping, "visiting")


def clients(client, n, stopping, word):
    """Runs `client` on n threads until stdin closes, then sets `stopping`
    and waits for each to finish what it was doing."""
    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    print(word, flush=True)
    sys.stdin.read()
    stopping.set()
    for t in threads:
        t.join(timeout=15)


def balance(a):
    os.makedirs(a.dir, exist_ok=True)
    port = free_port()
    http = balancer_recipe(a, port) if a.recipe else sticky_balancer(a, port)
    conf = nginx_conf(a.dir, "balancer", 1, http)
    nginx = subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    run([nginx], lambda: port_open(port), port, f"the balancer (see {a.dir})")


def sticky_balancer(a, port):
    """The balancer that keeps each visitor on one node, as an ALB with
    stickiness does."""
    servers = "\n".join(f"        server {u};" for u in a.upstream)
    return f"""    upstream nodes {{
        hash $cookie_visitor consistent;
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def balancer_recipe(a, port):
    """infra/web/`a.recipe` with its marked lines made this world's, and
    each request's upstream answers logged to DIR/upstream.log (`/build/x
    404, 200`: asked of a node that lacked it, then of one that had it)."""
    with open(os.path.join(RECIPES, a.recipe)) as f:
        recipe = f.read()
    servers = "".join(f"\\1server {u};\n" for u in a.upstream)
    out, n = re.subn(r"^([ \t]*)server .*# fleetsync: servers\n", servers, recipe, flags=re.M)
    log = os.path.join(a.dir, "upstream.log")
    out, m = re.subn(r"^([ \t]*)listen .*# fleetsync: listen$", rf"\1listen 127.0.0.1:{port};\n\1access_log {log} upstream;", out, flags=re.M)
    if (n, m) != (1, 1):
        sys.exit(f"web.py: infra/web/{a.recipe} lost a line marked `fleetsync:` (servers, listen)")
    return "    log_format upstream '$uri $upstream_status';\n" + out


ASSETS = re.compile(rb'(?:src|href)="(/[^"]+)"')


def browse(a):
    u = urllib.parse.urlsplit(a.url)
    out = open(a.out, "a", buffering=1)
    lock = threading.Lock()
    stopping = threading.Event()

    def get(conn, path, cookie):
        conn.request("GET", path, headers={"Cookie": f"visitor={cookie}"})
        r = conn.getresponse()
        return r.status, r.read()

    def client():
        while not stopping.is_set():
            visitor = os.urandom(8).hex()
            start = time.time()
            line = {"start": start, "status": 0, "ids": [], "assets": {}, "error": None}
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
            try:
                status, body = get(conn, u.path or "/", visitor)
                line["status"] = status
                line["ids"] = sorted({m.decode() for m in IDS.findall(body)})
                assets = sorted({m.decode() for m in ASSETS.findall(body)})
                stopping.wait(a.think)
                for path in assets:
                    line["assets"][path], _ = get(conn, path, visitor)
            except (OSError, http.client.HTTPException) as e:
                line["error"] = f"{type(e).__name__}: {e}"
            finally:
                conn.close()
            with lock:
                out.write(json.dumps(line) + "\n")

    clients(client, a.clients, stopping, "browsing")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--children", type=int, default=8)
    s.add_argument("--recipe", default="nginx-php-fpm.conf", help="a file of infra/web/")
    v = sub.add_parser("visit")
    v.add_argument("--url", required=True)
    v.add_argument("--clients", type=int, default=8)
    v.add_argument("--out", required=True)
    lb = sub.add_parser("balance")
    lb.add_argument("--dir", required=True)
    lb.add_argument("--upstream", action="append", required=True)
    lb.add_argument("--recipe", help="a balancer recipe of infra/web/ (default: sticky, as an ALB)")
    br = sub.add_parser("browse")
    br.add_argument("--url", required=True)
    br.add_argument("--clients", type=int, default=8)
    br.add_argument("--think", type=float, default=1.0)
    br.add_argument("--out", required=True)
    a = ap.parse_args()
    {"serve": serve, "visit": visit, "balance": balance, "browse": browse}[a.cmd](a)


if __name__ == "__main__":
    main()
