#!/usr/bin/env python3
"""Large objects: fleetsync-agent's throughput against the loopback limit.

Run through `infra/local/bench big`, which starts the S3 server and builds
the agent. Two cases: one 1 GiB object, and 20 objects of 100 MiB. For each
of `--runs` rounds, every tool downloads the case cold into an empty
directory (the disk is synced first, untimed, so one tool's writeback does
not land on the next):

- `curl` with SigV4 (`--aws-sigv4`), body to /dev/null, the 20 objects
  with `-Z` (in parallel): the most the server and loopback deliver, with no
  disk write and no checksum. This is the limit the others are compared to.
- the same `curl` writing the files: the limit once the page cache is
  written too (still no checksum, no rename).
- `fleetsync-agent pull` (ranged parallel GETs for large objects, each
  written in place, the whole object MD5-verified, then renamed in).
- `s5cmd cp` and `rclone copy`, for reference.

Prints medians, MiB/s, each tool's share of curl's throughput, and peak RSS.

`--dest-root /dev/shm/x` writes the downloads to memory (tmpfs) instead of
the disk: on this VM the disk's writeback makes the same download vary 2-3x
between runs, which hides the tools' own differences.
"""
import shutil
import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the peers' command lines and the runner)

BUCKET = bench.BUCKET
EP = os.environ["AWS_ENDPOINT_URL_S3"]
MiB = 1 << 20


def make(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def curl(prefix, names, dest=None):
    """curl GETs of the objects, in parallel when several: bodies to
    /dev/null, or to files in `dest`."""
    argv = ["curl", "-sSf", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
            f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}"]
    if len(names) > 1:
        argv += ["-Z", "--parallel-max", str(len(names))]
    for n in names:
        argv += [f"{EP}/{BUCKET}/{prefix}/{n}", "-o", os.path.join(dest, n) if dest else "/dev/null"]
    return argv


def tools(work):
    peers = bench.tools(work)

    def pull(prefix):
        return lambda d: [os.environ["FLEETSYNC_AGENT"], "pull", f"s3://{BUCKET}/{prefix}", "--dest", d, "--state-dir", d + ".state"]

    return {
        "curl (to /dev/null)": lambda prefix, names: (lambda d: curl(prefix, names), {}),
        "curl (to files)": lambda prefix, names: (lambda d: curl(prefix, names, d), {}),
        "fleetsync": lambda prefix, names: (pull(prefix), {}),
        "s5cmd cp": lambda prefix, names: (
            lambda d: ["s5cmd", "--endpoint-url", EP, "--log", "error", "cp", f"s3://{BUCKET}/{prefix}/*", d + "/"], {}),
        "rclone copy": lambda prefix, names: (
            lambda d: ["rclone", "copy", "--transfers", "20", f"local:{BUCKET}/{prefix}", d], peers["rclone sync"][1]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dest-root", help="where the downloads go (default: the work directory)")
    a = ap.parse_args()

    os.makedirs(a.work, exist_ok=True)
    src = os.path.join(a.work, "src")
    cases = [("1 GiB object", "one", {"object.bin": 1024 * MiB}),
             ("20 x 100 MiB", "twenty", {f"part-{i:02}.bin": 100 * MiB for i in range(20)})]
    subprocess.run(["aws", "--endpoint-url", EP, "s3", "mb", f"s3://{BUCKET}"], check=True, stdout=subprocess.DEVNULL)
    for _, prefix, files in cases:
        for name, size in files.items():
            make(os.path.join(src, prefix, name), size)
        subprocess.run(["s5cmd", "--endpoint-url", EP, "--log", "error", "cp", os.path.join(src, prefix) + "/",
                        f"s3://{BUCKET}/{prefix}/"], check=True)
    print(f"objects uploaded; {a.runs} runs per case; server: SeaweedFS on 127.0.0.1", flush=True)

    all_tools = tools(a.work)
    results = {}
    trash = os.path.join(a.work, "trash")
    for r in range(a.runs):
        for case, prefix, files in cases:
            total = sum(files.values())
            for t, make_cmd in all_tools.items():
                argv, env = make_cmd(prefix, sorted(files))
                dest = os.path.join(a.dest_root or a.work, "dest-" + "".join(c if c.isalnum() else "-" for c in t))
                bench.set_aside(dest, trash)
                bench.set_aside(dest + ".state", trash)
                os.makedirs(dest)
                subprocess.run(["sync"], check=True)
                secs, rss, _ = bench.run(argv(dest), env)
                if t != "curl (to /dev/null)":
                    for name, size in files.items():
                        got = os.path.getsize(os.path.join(dest, name))
                        if got != size:
                            sys.exit(f"{t}: {name} is {got} bytes, expected {size}")
                results.setdefault((case, t), []).append((secs, rss, total))
                if a.dest_root:  # memory, not disk: free it at once
                    shutil.rmtree(dest)
                    shutil.rmtree(dest + ".state", ignore_errors=True)
                print(f"  round {r + 1} {case:13} {t:20} {secs:6.2f} s {total / MiB / secs:7.0f} MiB/s", flush=True)
        subprocess.run(["rm", "-rf", trash], check=True)

    print()
    print("| case | tool | median s | MiB/s | vs curl | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for case, _, files in cases:
        limit = statistics.median(x[0] for x in results[(case, "curl (to /dev/null)")])
        for t in all_tools:
            runs = results[(case, t)]
            med = statistics.median(x[0] for x in runs)
            rate = runs[0][2] / MiB / med
            print(f"| {case} | {t} | {med:.2f} | {rate:.0f} | {limit / med * 100:.0f}% | {max(x[1] for x in runs):.0f} |")


if __name__ == "__main__":
    main()
