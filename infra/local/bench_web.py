#!/usr/bin/env python3
"""What a pull costs a serving web server: p50 and p99 of a PHP page that
does real CPU work, served by a real nginx and PHP-FPM (infra/local/web.py)
to N clients, with no pull and during a cold pull and a 1% pull of the
bench tree, the pull at the agent's default priority (low), at
`--priority idle` (SCHED_IDLE) and at `--priority normal`, on the same
cores, next to the bounds: the same files written by `tar -x` from the
page cache, or the unchanged tree hard-linked by `cp -al`, then synced,
under SCHED_IDLE (no download, no hashing, the lowest priority). Prints
the ratios to the p99 with no pull and the pulls' times against the
un-niced pull's.

    infra/local/bench web [--files 10000] [--clients 8] [--idle 20] [--repeat 8] [--disk here] [--s3-nice N]

The pulls write to a node's disk as an EC2 instance has one: a journaled
ext4 file system on a loop device with direct I/O (`--disk loop`, the
default; it needs root). This
machine's own root file system is ext4 without a journal, and there
creating files shortly after deleting as many (every pull here follows
the removal of the last one) makes ext4 scan the recently freed inodes
for each new one: seconds of kernel CPU per pull that a node's EBS volume
(ext4 with its journal, or XFS) never spends. `--disk here` measures in
the work directory anyway.

The S3 server is remote on a node; here it shares the two cores. By
default its threads run under SCHED_IDLE (only on a core nothing else
wants), the nearest this machine gets to a server elsewhere; `--s3-nice
N` runs them at nice N instead (0: as started).

Each phase runs --repeat times, the phases taking turns (so that drift
over the run hits them all alike); a phase's latencies are those of every
request that overlapped one of its pulls, and its pull time is
their median. One pull is a second or two and a few hundred requests, too
few for a p99 on its own. The p99 with no pull is taken over the first
--idle seconds and over 1.5 s starting 0.5 s after each pull's tree was
removed and synced.

At `--priority low` and `normal` a pull outranks the S3 server under
SCHED_IDLE, at `idle` it shares the spare time with it: the "pull /
normal" column is this machine's, where every pull waits for its
server's share of the cores; from a remote S3 none would.

Run by infra/local/bench (which starts the S3 server and builds the
release binaries: FLEETSYNC_AGENT, FLEETSYNC_BASTION).
"""
import argparse
import atexit
import bisect
import json
import os
import signal
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


# The phase without a pull: the baseline of every ratio.
NONE = "no pull"
# How each pull runs: the agent's --priority.
MODES = ("low", "idle", "normal")
# The bounds: the least a pull can cost the server, at the lowest priority
# any mode here has (SCHED_IDLE, best-effort I/O level 7): for a cold pull
# the same files written from a tar in the page cache and synced (no
# download, no hashing); for a 1% pull the unchanged tree hard-linked into
# a new directory (`cp -al` of the live release) and synced.
LOWEST = ["chrt", "--idle", "0", "ionice", "-c", "2", "-n", "7"]
BOUNDS = {
    "cold": ("tar -x and sync", [*LOWEST, "sh", "-c", 'tar -xf "$1" -C "$2" && sync -f "$2"', "bound"]),
    "1%": ("cp -al and sync", [*LOWEST, "sh", "-c", 'cp -al "$1" "$2" && sync -f "$2"', "bound"]),
}


def timed(what, cmd):
    """Runs `cmd` (a pull or a bound), exiting with one line naming `what`
    if it fails; returns when it started and ended."""
    t0 = time.time()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip()).splitlines()
        sys.exit(f"bench web: {what} failed (exit {out.returncode}): {last[-1] if last else 'no output'}")
    return t0, time.time()


def pull(dest, state, source, rid, mode):
    return timed(f"the pull of {rid} at priority {mode}", [
        os.environ["FLEETSYNC_AGENT"], "pull", source, "--dest", dest, "--state-dir", state, "--releases",
        "--release-id", rid, "--json", "--priority", mode])


def s3_threads(pid_file, how):
    """Every thread of the S3 server (started by infra/local/bench, its pid
    in `pid_file`) under `how` ("idle" or a nice value): both are a
    thread's, and the threads it starts later inherit them."""
    with open(pid_file) as f:
        pid = f.read().strip()
    if how == "idle":
        run(["chrt", "--all-tasks", "--idle", "-p", "0", pid])
    else:
        run(["renice", "-n", str(how), "-p", *os.listdir(f"/proc/{pid}/task")])
    what = "under SCHED_IDLE" if how == "idle" else f"at nice {how}"
    print(f"the S3 server (pid {pid}) runs {what}", flush=True)


class Disk:
    """Where the pulls write: a journaled ext4 on a loop device (as a
    node's EBS volume), or the work directory. Unmounted and detached
    however the run ends (infra/local/bench removes the work directory on
    exit, and a mount in it would be left behind)."""

    def __init__(self, work, kind):
        self.dir, self.device, self.mounted = os.path.join(work, "nodes"), None, False
        self.what = "the work directory's file system"
        os.makedirs(self.dir)
        if kind == "here":
            return
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
        image = os.path.join(work, "disk.img")
        try:
            with open(image, "wb") as f:
                f.truncate(8 << 30)
            # Inode tables and journal written now, not by a kernel thread
            # in the background while the first phases run.
            run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image])
            self.device = run(["losetup", "--direct-io=on", "-f", "--show", image]).stdout.strip()
            run(["mount", self.device, self.dir])
            self.mounted = True
        except (OSError, subprocess.CalledProcessError) as e:
            why = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else e
            sys.exit(f"bench web: cannot set up a loop device for the nodes' disk ({why}); "
                     "run as root, or pass --disk here to measure on the work directory's file system")
        with open(f"/sys/block/{os.path.basename(self.device)}/loop/dio") as f:
            dio = f.read().strip() == "1"
        self.what = f"a journaled ext4 on {self.device} ({'direct I/O' if dio else 'buffered: no direct I/O here'})"

    def close(self):
        if self.mounted:
            if subprocess.run(["umount", self.dir]).returncode != 0:
                print(f"bench web: {self.dir} is busy; detaching it lazily", file=sys.stderr)
                subprocess.run(["umount", "-l", self.dir])
            self.mounted = False
        if self.device:
            subprocess.run(["losetup", "-d", self.device])
            self.device = None


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def responses(log):
    """(start, end) of every 200 in the visitors' log, sorted by start."""
    out = []
    for line in open(log):
        r = json.loads(line)
        if r["status"] == 200:
            out.append((r["start"], r["end"]))
    return sorted(out)


# The longest a response can take (the visitors' timeout in web.py): how
# far before a window to look for the responses that overlap it.
LONGEST = 10.0


def latencies(rs, start, end):
    """The latencies in ms of the responses `rs` that overlap [start, end]:
    every request the pull could have delayed (counting only those wholly
    inside would leave slow ones out more often than fast ones)."""
    i = bisect.bisect_left(rs, (start - LONGEST,))
    out = []
    while i < len(rs) and rs[i][0] < end:
        if rs[i][1] > start:
            out.append((rs[i][1] - rs[i][0]) * 1000)
        i += 1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--idle", type=float, default=20, help="seconds with no pull measured first (and 1.5 s after each pull)")
    ap.add_argument("--repeat", type=int, default=8, help="pulls per phase")
    ap.add_argument("--disk", choices=("loop", "here"), default="loop",
                    help="loop: the nodes on a journaled ext4 on a loop device, as an EBS volume (root); here: the work directory")
    ap.add_argument("--s3-nice", type=int, help="run the S3 server at this nice value instead of under SCHED_IDLE "
                    "(on a node S3 is remote; here it shares the web server's cores)")
    a = ap.parse_args()
    s3_threads(os.path.join(os.path.dirname(os.path.abspath(a.work)), "weed.pid"), "idle" if a.s3_nice is None else a.s3_nice)
    os.makedirs(a.work, exist_ok=True)
    bucket = "webbench"
    subprocess.run(["aws", "--endpoint-url", os.environ["AWS_ENDPOINT_URL_S3"], "s3", "mb", f"s3://{bucket}"],
                   check=True, stdout=subprocess.DEVNULL)
    source = f"s3://{bucket}/web"

    # The tree pulled: the bench tree, v1 and a 1% change of it.
    src = os.path.join(a.work, "src")
    gentree.generate(src, a.files, 0, seed=7)
    publish(src, source, "v1")
    tree = os.path.join(a.work, "v1.tar")
    run(["tar", "-cf", tree, "-C", src, "."])
    gentree.mutate(src, max(2, a.files // 100), seed=8)
    publish(src, source, "v2")
    disk = Disk(a.work, a.disk)

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
        phases = {NONE: ([(t0, time.time())], [])}
        runs = [(kind, m) for kind in ("cold", "1%") for m in (*MODES, "bound")]
        for rep in range(a.repeat):
            # Each phase in turn, starting one further each time, so that
            # drift over the run hits them all alike.
            for kind, mode in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                node = tempfile.mkdtemp(dir=disk.dir)
                dest, state = os.path.join(node, "www"), os.path.join(node, "state")
                if kind == "1%":
                    # v1 first (timed apart from the measurement), then v2.
                    pull(dest, state, source, "v1", "normal")
                    time.sleep(1)
                    if mode == "bound":
                        start, end = timed(BOUNDS[kind][0], [*BOUNDS[kind][1], os.path.join(dest, "current/"), os.path.join(node, "next")])
                    else:
                        start, end = pull(dest, state, source, "v2", mode)
                elif mode == "bound":
                    os.makedirs(dest)
                    start, end = timed(BOUNDS[kind][0], [*BOUNDS[kind][1], tree, dest])
                else:
                    start, end = pull(dest, state, source, "v1", mode)
                name = f"{kind}: {BOUNDS[kind][0]} (the bound)" if mode == "bound" else f"{kind} pull, priority {mode}"
                windows, times = phases.setdefault(name, ([], []))
                windows.append((start, end))
                times.append(end - start)
                # Removed and written back before the next window, so
                # that no phase pays for the one before it.
                subprocess.run(["rm", "-rf", node], check=True)
                subprocess.run(["sync", "-f", disk.dir], check=True)
                # No pull again: the p99 without a pull is taken over the
                # same stretch of the run as the pulls' (it drifts).
                time.sleep(0.5)
                t0 = time.time()
                time.sleep(1.5)
                phases[NONE][0].append((t0, time.time()))
    finally:
        visitors.stdin.close()
        visitors.wait()
        server.stdin.close()
        server.wait()

    rs = responses(log)

    def phase(name):
        windows, times = phases[name]
        xs = [x for start, end in windows for x in latencies(rs, start, end)]
        return xs, (statistics.median(times) if times else None)

    idle, _ = phase(NONE)
    p99_idle = percentile(idle, 99)
    print(f"# A CPU-bound PHP page (hashing), {a.clients} clients on PHP-FPM, {os.cpu_count()} cores; "
          f"pulls of {a.files} files onto {disk.what}, {a.repeat} of each, medians")
    print(f"{'phase':40} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99 / no pull':>13} {'pull s':>8} {'pull / normal':>13}")
    for name in phases:
        xs, dur = phase(name)
        p50, p99 = percentile(xs, 50), percentile(xs, 99)
        normal = phase(name.split(" ")[0].rstrip(":") + " pull, priority normal")[1] if dur else None
        pull_s = f"{dur:.2f}" if dur else "-"
        vs = f"{dur / normal:.2f}x" if dur else "-"
        print(f"{name:40} {len(xs):>8} {p50:>8.1f} {p99:>8.1f} {p99 / p99_idle:>12.2f}x {pull_s:>8} {vs:>13}")

if __name__ == "__main__":
    main()
