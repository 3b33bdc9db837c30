#!/usr/bin/env python3
"""Times `fleetsync sync` on simulated fleets of 1, 10 and 50 nodes.

Run through `infra/local/bench fleet`, which starts the whole local world
(S3, moto, the SSM emulator) and builds release binaries. For each fleet
size and each transport (SSH: one real sshd per instance; SSM: the
emulator), a cold deploy of a small tree onto empty nodes and a no-op
deploy. Prints the bastion's wall time against the slowest single node's
pull time (from the agents' own reports), the orchestration overhead
(wall / slowest - 1), and the bastion's CPU time and peak RSS.

`--batch` covers the fleet, so every node runs at once: the overhead is
what discovery, the fleet lock, the transport and polling add on top of
the slowest node.

`--fleets 2000:sim` is the scale run: 2,000 instances in moto whose SSM
agents are simulated by the emulator (each answers after about
`--sim-ms` with a canned report marked as a simulation; nothing is
pulled), with the emulator throttling above `--ssm-rate` requests a second.
It measures the bastion alone: wall time over the slowest simulated node,
CPU, peak RSS, and SSM API calls per node and per second (throttled ones
included), read from the emulator's own counts.
"""
import urllib.request
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gentree  # noqa: E402

FLEET = [sys.executable, os.path.join(HERE, "fleet.py")]


def sh(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout


def timed(argv, work):
    """Runs argv; returns (exit code, stdout, stderr, start time, wall seconds, rusage, peak RSS MiB).
    The rusage (CPU) is the bastion's own from wait4, which includes the ssh
    clients it ran (its cost on the host it runs on). The peak RSS comes
    from GNU time: a child of this Python process would report at least
    this process's own size (Linux carries ru_maxrss across exec)."""
    out_path, err_path = os.path.join(work, "bastion.out"), os.path.join(work, "bastion.err")
    rss_path = os.path.join(work, "bastion.rss")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_path] + argv, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    with open(rss_path) as f:
        rss = int(f.read().split()[-1]) / 1024
    return code, open(out_path, "rb").read(), open(err_path, "rb").read(), t0, wall, ru, rss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--via", default="ssh,ssm")
    ap.add_argument("--fleets", help="fleet sizes with their transports instead of --sizes x --via, e.g. 100:ssm,50:ssh")
    ap.add_argument("--files", type=int, default=300, help="files in the tree each node pulls")
    ap.add_argument("--sim-ms", type=int, default=2000, help="sim: how long a simulated node takes (+-25%%)")
    ap.add_argument("--ssm-rate", type=float, default=40, help="sim: SSM requests a second before ThrottlingException")
    a = ap.parse_args()
    if a.fleets:
        fleets = [(int(n), vias.split("+")) for n, vias in (f.split(":") for f in a.fleets.split(","))]
    else:
        fleets = [(int(n), a.via.split(",")) for n in a.sizes.split(",")]
    os.makedirs(a.work, exist_ok=True)
    bastion = os.environ["FLEETSYNC_BASTION"]
    env = dict(os.environ, FLEETSYNC_AGENT_DIR=os.path.dirname(os.environ["FLEETSYNC_AGENT"]))

    src = os.path.join(a.work, "tree")
    gentree.generate(src, files=a.files, big=0, seed=7)
    sh(["aws", "s3", "mb", "s3://fleetbench"])
    sh(["s5cmd", "--endpoint-url", os.environ["AWS_ENDPOINT_URL_S3"], "--log", "error", "sync", src + "/", "s3://fleetbench/app/"])
    size_mib = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 2**20
    print(f"tree per node: {a.files} files, {size_mib:.1f} MiB; every node pulls it at once (--batch covers the fleet)\n")

    rows = []
    sims = []
    subnet = 10
    for k, (n, vias) in enumerate(fleets):
        group = f"bench{n}-{k}"
        if n > 240:  # moto puts a group in one subnet: a /20 (4,000 addresses) from 127.0.64.0
            sh(FLEET + ["create", group, "--size", str(n), "--subnet", "64", "--subnet-bits", "20"], env=env)
        else:
            sh(FLEET + ["create", group, "--size", str(n), "--subnet", str(subnet)], env=env)
            subnet += 1
        nodes = os.path.join(a.work, f"nodes{n}-{k}")
        if vias == ["sim"]:
            sims.append(simulate(a, bastion, env, group, n, nodes))
            continue
        sh(FLEET + ["nodes-up", group, "--dir", nodes], env=env)
        try:
            for via in vias:
                for case in ("cold", "no-op"):
                    if case == "cold":  # empty nodes: DEST and state removed
                        for node in os.listdir(nodes):
                            srv = os.path.join(nodes, node, "srv")
                            # The directory itself stays: it is bind-mounted
                            # into the node's sshd namespace.
                            # So does etc/: the node's agent.toml lives there.
                            for entry in os.listdir(srv) if os.path.isdir(srv) else []:
                                if entry != "etc":
                                    shutil.rmtree(os.path.join(srv, entry))
                    code, out, err, t0, wall, ru, rss = timed([
                        bastion, "sync", "--group", group, "--source", "s3://fleetbench/app", "--dest", "/srv/www",
                        "--via", via, "--ssh-config", os.path.join(nodes, "ssh_config"), "--json",
                    ], a.work)
                    if code != 0:
                        sys.exit(f"{via} {case} {n} nodes failed ({code}): {err.decode()[-2000:]}")
                    report = json.loads(out)
                    agents = [x["agent"] for x in report["nodes"]]
                    slowest = max(x["durations"]["total_ms"] for x in agents) / 1000
                    # Where the rest of the wall time went, from the agents'
                    # own clocks: before the first agent started (discovery,
                    # lock, transport), between the first start and the last
                    # end (staggered starts), after the last end (collecting,
                    # the second discovery, releasing the lock, the report).
                    first = min(x["started_at_ms"] for x in agents) / 1000 - t0
                    window = (max(x["finished_at_ms"] for x in agents) - min(x["started_at_ms"] for x in agents)) / 1000
                    tail = wall - first - window
                    cpu = ru.ru_utime + ru.ru_stime
                    rows.append((n, via, case, wall, slowest, wall / slowest - 1, cpu, rss, first, window, tail))
                    print(f"{n:>3} nodes {via:<3} {case:<5}: wall {wall:6.2f} s, slowest node {slowest:6.2f} s, "
                          f"overhead {100 * (wall / slowest - 1):6.1f}% (before first agent {first:.2f} s, agents {window:.2f} s, "
                          f"after last {tail:.2f} s), bastion CPU {cpu:5.2f} s", flush=True)
        finally:
            sh(FLEET + ["nodes-down", "--dir", nodes], env=env)

    if sims:
        print("\n| simulated nodes | SSM rate limit | bastion wall | slowest node | overhead | before first node (discovery, lock, sends) | after last end | bastion CPU | peak RSS | SSM calls | calls per node | calls per second | throttled |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sims:
            print("| {n} | {rate:.0f}/s | {wall:.2f} s | {slowest:.2f} s | {over:.1f}% | {first:.2f} s | {tail:.2f} s | {cpu:.2f} s | {rss:.0f} MiB | {calls} | {per_node:.2f} | {per_sec:.1f} | {throttled} |".format(**r))
        print("\nSSM calls by operation: " + "; ".join(", ".join(f"{op} {c}" for op, c in sorted(r["ops"].items())) for r in sims))
    if not rows:
        return
    print("\n| nodes | via | case | bastion wall | slowest node pull | overhead | before first agent | first agent start to last end | after last end | bastion CPU (incl. ssh) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, via, case, wall, slowest, over, cpu, _, first, window, tail in rows:
        print(f"| {n} | {via} | {case} | {wall:.2f} s | {slowest:.2f} s | {100 * over:.1f}% | {first:.2f} s | {window:.2f} s | {tail:.2f} s | {cpu:.2f} s |")
    print("\n| nodes | via | case | bastion peak RSS (or its largest ssh client) |")
    print("|---|---|---|---|")
    for n, via, case, _wall, _slowest, _over, _cpu, rss, *_ in rows:
        print(f"| {n} | {via} | {case} | {rss:.0f} MiB |")


def ssm_call(op, body):
    """A call to the SSM emulator's own operations (not signed: it does not check)."""
    req = urllib.request.Request(os.environ["AWS_ENDPOINT_URL_SSM"] + "/", data=json.dumps(body).encode(), method="POST",
                                 headers={"X-Amz-Target": f"AmazonSSM.{op}", "Content-Type": "application/x-amz-json-1.1"})
    return json.load(urllib.request.urlopen(req))


def simulate(a, bastion, env, group, n, nodes):
    """One deploy of `n` simulated instances over SSM; what the bastion cost."""
    sh(FLEET + ["nodes-up", group, "--dir", nodes, "--simulated", str(a.sim_ms)], env=env)
    try:
        ssm_call("FleetsyncEmulatorConfigure", {"RateLimit": a.ssm_rate})
        before = ssm_call("FleetsyncEmulatorStats", {})
        code, out, err, t0, wall, ru, rss = timed([
            bastion, "sync", "--group", group, "--source", "s3://fleetbench/app", "--dest", "/srv/www", "--via", "ssm", "--json",
        ], a.work)
        after = ssm_call("FleetsyncEmulatorStats", {})
    finally:
        ssm_call("FleetsyncEmulatorConfigure", {"RateLimit": 0})
        sh(FLEET + ["nodes-down", "--dir", nodes], env=env)
    if code != 0:
        sys.exit(f"sim {n} nodes failed ({code}): {err.decode()[-2000:]}")
    report = json.loads(out)
    agents = [x["agent"] for x in report["nodes"]]
    slowest = max(x["durations"]["total_ms"] for x in agents) / 1000
    last_end = max(x["finished_at_ms"] for x in agents) / 1000
    first = min(x["started_at_ms"] for x in agents) / 1000 - t0
    ops = {op: c - before["requests"].get(op, 0) for op, c in after["requests"].items() if c - before["requests"].get(op, 0) > 0}
    ops.pop("FleetsyncEmulatorStats", None)
    ops.pop("FleetsyncEmulatorConfigure", None)
    calls = sum(ops.values())
    r = dict(n=n, rate=a.ssm_rate, wall=wall, slowest=slowest, over=100 * (wall / slowest - 1), tail=t0 + wall - last_end, first=first,
             cpu=ru.ru_utime + ru.ru_stime, rss=rss, calls=calls, per_node=calls / n, per_sec=calls / wall,
             throttled=after["throttled"] - before["throttled"], ops=ops)
    print(f"{n} simulated nodes over ssm: wall {wall:.2f} s, slowest {slowest:.2f} s, overhead {r['over']:.1f}%, "
          f"before first node {first:.2f} s, after last end {r['tail']:.2f} s, CPU {r['cpu']:.2f} s, RSS {rss:.0f} MiB, {calls} SSM calls "
          f"({r['per_node']:.2f} per node, {r['per_sec']:.1f}/s, {r['throttled']} throttled)", flush=True)
    return r


if __name__ == "__main__":
    main()
