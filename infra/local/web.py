#!/usr/bin/env python3
"""A real nginx and PHP-FPM with OPcache for the local world, serving a
node's DEST, and clients that record what each visitor got. The server
uses the shipped recipe (infra/web/nginx-php-fpm.conf: only its lines
marked `fleetsync:` are replaced) and OPcache settings
(infra/web/php-opcache.ini).

    web.py serve --dir DIR --root WEBROOT          # prints "ready PORT"; runs until stdin closes
    web.py visit --url URL --clients N --out FILE  # until stdin closes: one JSON line per response

`serve` listens on 127.0.0.1 (a free port) and runs PHP-FPM on a Unix
socket in DIR; both are stopped when stdin closes or on SIGTERM. nginx runs
as root (its workers too: the test's trees are under private temporary
directories), PHP-FPM with -R.

`visit` runs N clients, each requesting URL in a loop over one kept-alive
connection (a new one after an error), and writes per response:
{"start": epoch s, "end": epoch s, "status": HTTP status or 0 for a
transport error, "ids": the distinct release ids the page named, "error"}.
A page names ids as `release=ID` words.
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


def serve(a):
    os.makedirs(a.dir, exist_ok=True)
    port = free_port()
    sock = os.path.join(a.dir, "php-fpm.sock")
    recipe = open(os.path.join(RECIPES, "nginx-php-fpm.conf")).read()
    server, n = re.subn(r"^(\s*)listen .*# fleetsync: listen$", rf"\1listen 127.0.0.1:{port};", recipe, flags=re.M)
    server, m = re.subn(r"^(\s*)root .*# fleetsync: root$", rf"\1root {a.root};", server, flags=re.M)
    server, k = re.subn(r"^(\s*)fastcgi_pass .*# fleetsync: fastcgi_pass$", rf"\1fastcgi_pass unix:{sock};", server, flags=re.M)
    if (n, m, k) != (1, 1, 1):
        sys.exit("web.py: infra/web/nginx-php-fpm.conf lost a line marked `fleetsync:` (listen, root, fastcgi_pass)")
    shutil.copy("/etc/nginx/fastcgi_params", os.path.join(a.dir, "fastcgi_params"))
    shutil.copy("/etc/nginx/mime.types", os.path.join(a.dir, "mime.types"))
    conf = os.path.join(a.dir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""user root;
worker_processes 2;
pid {a.dir}/nginx.pid;
error_log {a.dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    include mime.types;
    access_log off;
    client_body_temp_path {a.dir}/body;
    fastcgi_temp_path {a.dir}/fastcgi;
    proxy_temp_path {a.dir}/proxy;
    uwsgi_temp_path {a.dir}/uwsgi;
    scgi_temp_path {a.dir}/scgi;
    keepalive_requests 100000;
{server}
}}
""")
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
pm = static
pm.max_children = {a.children}
catch_workers_output = yes
{chr(10).join(opcache)}
""")
    # Both die with this process, however it ends (a test killed mid-run
    # must not leave servers behind).
    fpm = subprocess.Popen([php_fpm(), "-F", "-R", "-y", fpm_conf], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    nginx = subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def stop(*_, code=0):
        for p in (nginx, fpm):
            if p.poll() is None:
                p.terminate()
        for p in (nginx, fpm):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        os._exit(code)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.time() + 30
    while not (os.path.exists(sock) and port_open(port)):
        if time.time() > deadline or nginx.poll() is not None or fpm.poll() is not None:
            print(f"web.py: nginx or php-fpm did not start (see {a.dir})", file=sys.stderr)
            stop(code=1)
        time.sleep(0.05)
    print(f"ready {port}", flush=True)
    sys.stdin.read()  # until the test closes it (or dies)
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

    threads = [threading.Thread(target=client, daemon=True) for _ in range(a.clients)]
    for t in threads:
        t.start()
    print("visiting", flush=True)
    sys.stdin.read()
    stopping.set()
    for t in threads:
        t.join(timeout=15)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--children", type=int, default=8)
    v = sub.add_parser("visit")
    v.add_argument("--url", required=True)
    v.add_argument("--clients", type=int, default=8)
    v.add_argument("--out", required=True)
    a = ap.parse_args()
    serve(a) if a.cmd == "serve" else visit(a)


if __name__ == "__main__":
    main()
