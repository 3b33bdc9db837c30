#!/usr/bin/env python3
"""What a pull costs a serving web server: p50 and p99 of a PHP page that
does real CPU work, served by a real nginx and PHP-FPM (infra/local/web.py)
with clients saturating it, idle and during a cold pull and a 1% pull of
the bench tree, the pull at the agent's default (low) priority and at
`--priority normal`, on the same cores. Prints the ratios to the idle p99
and the pulls' times against the un-niced pull's.

    infra/local/bench web [--files 10000] [--clients 8] [--idle 10] [--repeat 5] [--s3-nice 19]

Each pull runs --repeat times (low and normal priority taking turns, so
that drift over the run hits both alike); a phase's latencies are those of
every request that ran wholly inside one of its pulls, and its pull time
is their median. One pull is a few seconds and a few hundred requests, too
few for a p99 on its own.

Run by infra/local/bench (which starts the S3 server and builds the
release binaries: FLEETSYNC_AGENT, FLEETSYNC_BASTION).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gentree  # noqa: E402

# About 10 ms of CPU per request here (185 a second on 2 cores): hashing, not sleeping.
PAGE = "<?php $x = 'fleetsync'; for ($i = 0; $i < 60000; $i++) { $x = sha1($x); } echo 'release=bench ', $x, \"\\n\";\n"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def publish(src, source, rid):
    run([os.environ["FLEETSYNC_BASTION"], "publish", src, "--source", source, "--release-id", rid])


def pull(dest, state, source, rid, priority):
    t0 = time.time()
    out = subprocess.run([os.environ["FLEETSYNC_AGENT"], "pull", source, "--dest", dest, "--state-dir", state, "--releases",
                          "--release-id", rid, "--priority", priority, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"the pull failed: {out.stderr}")
    return t0, time.time()


def renice_s3(pid_file, nice):
    """Every thread of the S3 server (started by infra/local/bench, its pid
    in `pid_file`) at `nice`: a nice value is a thread's, and the threads
    it starts later inherit it."""
    with open(pid_file) as f:
        pid = f.read().strip()
    tids = os.listdir(f"/proc/{pid}/task")
    run(["renice", "-n", str(nice), "-p", *tids])
    print(f"the S3 server (pid {pid}, {len(tids)} threads) runs at nice {nice}", flush=True)


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def latencies(log, start, end):
    out = []
    for line in open(log):
        r = json.loads(line)
        if r["status"] == 200 and start <= r["start"] and r["end"] <= end:
            out.append((r["end"] - r["start"]) * 1000)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--idle", type=float, default=20, help="seconds of idle load measured")
    ap.add_argument("--repeat", type=int, default=5, help="pulls per phase")
    ap.add_argument("--s3-nice", type=int, help="run the S3 server at this nice value: on a real node S3 is remote, "
                    "here it shares the web server's cores, and this shows how much of a pull's cost is the server's")
    a = ap.parse_args()
    if a.s3_nice is not None:
        renice_s3(os.path.join(os.path.dirname(os.path.abspath(a.work)), "weed.pid"), a.s3_nice)
    os.makedirs(a.work, exist_ok=True)
    bucket = "webbench"
    subprocess.run(["aws", "--endpoint-url", os.environ["AWS_ENDPOINT_URL_S3"], "s3", "mb", f"s3://{bucket}"],
                   check=True, stdout=subprocess.DEVNULL)
    source = f"s3://{bucket}/web"

    # The tree pulled: the bench tree, v1 and a 1% change of it.
    src = os.path.join(a.work, "src")
    gentree.generate(src, a.files, 0, seed=7)
    publish(src, source, "v1")
    gentree.mutate(src, max(2, a.files // 100), seed=8)
    publish(src, source, "v2")

    # The site being served: one CPU-bound page, its own DEST.
    site = os.path.join(a.work, "site", "public")
    os.makedirs(site)
    with open(os.path.join(site, "index.php"), "w") as f:
        f.write(PAGE)
    web = os.path.join(a.work, "web")
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "web.py"), "serve", "--dir", web, "--root", site],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = server.stdout.readline().split()[1]
    log = os.path.join(a.work, "responses.jsonl")
    visitors = subprocess.Popen([sys.executable, os.path.join(HERE, "web.py"), "visit", "--url", f"http://127.0.0.1:{port}/",
                                 "--clients", str(a.clients), "--out", log], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    visitors.stdout.readline()
    try:
        time.sleep(2)  # OPcache and the workers warm
        t0 = time.time()
        time.sleep(a.idle)
        phases = {"idle": ([(t0, time.time())], [])}
        for kind in ("cold", "1%"):
            for rep in range(a.repeat):
                for priority in (("low", "normal") if rep % 2 == 0 else ("normal", "low")):
                    node = tempfile.mkdtemp(dir=a.work)
                    dest, state = os.path.join(node, "www"), os.path.join(node, "state")
                    if kind == "1%":
                        # v1 first (timed apart from the measurement), then v2.
                        pull(dest, state, source, "v1", "normal")
                        time.sleep(1)
                        start, end = pull(dest, state, source, "v2", priority)
                    else:
                        start, end = pull(dest, state, source, "v1", priority)
                    windows, times = phases.setdefault(f"{kind} pull, priority {priority}", ([], []))
                    windows.append((start, end))
                    times.append(end - start)
                    subprocess.run(["rm", "-rf", node], check=True)
                    time.sleep(1)
    finally:
        visitors.stdin.close()
        visitors.wait()
        server.stdin.close()
        server.wait()

    def phase(name):
        windows, times = phases[name]
        xs = [x for start, end in windows for x in latencies(log, start, end)]
        return xs, (statistics.median(times) if times else None)

    idle, _ = phase("idle")
    p99_idle = percentile(idle, 99)
    print(f"# A CPU-bound PHP page (hashing), {a.clients} clients on PHP-FPM, {os.cpu_count()} cores; "
          f"pulls of {a.files} files, {a.repeat} of each, medians")
    print(f"{'phase':32} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99 / idle':>10} {'pull s':>8} {'pull / normal':>13}")
    for name in phases:
        xs, dur = phase(name)
        p50, p99 = percentile(xs, 50), percentile(xs, 99)
        normal = phase(name.split(",")[0] + ", priority normal")[1] if dur else None
        pull_s = f"{dur:.2f}" if dur else "-"
        vs = f"{dur / normal:.2f}x" if dur else "-"
        print(f"{name:32} {len(xs):>8} {p50:>8.1f} {p99:>8.1f} {p99 / p99_idle:>9.2f}x {pull_s:>8} {vs:>13}")

if __name__ == "__main__":
    main()
