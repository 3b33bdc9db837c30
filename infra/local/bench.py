#!/usr/bin/env python3
"""Times fleetsync-agent against its peers on the local S3 server.

Run through `infra/local/bench`, which starts the server and builds the
agent. For each tool and each of `--runs` rounds: a cold pull into an empty
directory, a no-op pull, and (after 1% of the files changed remotely, half
of them keeping their size) an update pull. Every result is checked against
the source; a tool that misses a change is reported WRONG, not just slow.
Requests are counted from the server's own metrics. Prints medians, the
ratio of each peer to fleetsync (>1 means fleetsync is faster), and peak RSS.
"""
import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gentree  # noqa: E402

BUCKET = "bench"
PREFIX = "tree"
EP = os.environ["AWS_ENDPOINT_URL_S3"]


def requests_so_far():
    text = urllib.request.urlopen(os.environ["FLEETSYNC_S3_METRICS"]).read().decode()
    n = 0
    for line in text.splitlines():
        if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{BUCKET}"' in line:
            n += int(float(line.rsplit(" ", 1)[1]))
    return n


def rclone_env():
    """rclone's remote `local:`, the local S3 server, from the environment."""
    return {
        "RCLONE_CONFIG_LOCAL_TYPE": "s3",
        "RCLONE_CONFIG_LOCAL_PROVIDER": "Other",
        "RCLONE_CONFIG_LOCAL_ENDPOINT": EP,
        "RCLONE_CONFIG_LOCAL_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_LOCAL_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_LOCAL_REGION": "us-east-1",
    }


def tools(work):
    aws_config = os.path.join(work, "aws-config")
    with open(aws_config, "w") as f:
        f.write("[default]\ns3 =\n  max_concurrent_requests = 64\n  max_queue_size = 10000\n")
    return {
        "fleetsync": (
            lambda d: [os.environ["FLEETSYNC_AGENT"], "pull", f"s3://{BUCKET}/{PREFIX}", "--dest", d, "--state-dir", d + ".state"],
            {},
        ),
        "s5cmd sync": (
            lambda d: ["s5cmd", "--endpoint-url", EP, "--numworkers", "64", "--log", "error", "sync", "--delete", f"s3://{BUCKET}/{PREFIX}/*", d + "/"],
            {},
        ),
        "rclone sync": (
            lambda d: ["rclone", "sync", "--fast-list", "--checksum", "--transfers", "64", "--checkers", "64", f"local:{BUCKET}/{PREFIX}", d],
            rclone_env(),
        ),
        "aws s3 sync": (
            lambda d: ["aws", "--endpoint-url", EP, "s3", "sync", "--delete", "--only-show-errors", f"s3://{BUCKET}/{PREFIX}", d],
            {"AWS_CONFIG_FILE": aws_config},
        ),
    }


def set_aside(path, trash):
    """Moves a tree out of the way instead of deleting it. Deleting 10,000
    files makes ext4 (with discard) do seconds of deferred work that lands on
    whatever command runs next: measured here, a cold pull right after an
    `rm -rf` of the previous tree took 8.7-10.2 s instead of 5.1-5.5 s. The
    trash is deleted after the timed runs."""
    if os.path.exists(path):
        os.makedirs(trash, exist_ok=True)
        os.rename(path, os.path.join(trash, f"{len(os.listdir(trash))}"))


def timed(argv, env):
    """Runs one command under GNU time; returns (seconds, peak RSS in MiB,
    stdout), and exits with its stderr when it fails.

    The peak RSS comes from GNU time, not from this script's wait4: a child
    forked from Python inherits the Python process's own peak as its
    ru_maxrss (Linux carries the high-water mark across exec), which made
    every small figure read as this script's size."""
    rss_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fleetsync-bench-rss.{os.getpid()}")
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file] + argv, env={**os.environ, **env},
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{argv[0]} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}")
    with open(rss_file) as f:
        rss_kib = int(f.read().split()[-1])
    os.remove(rss_file)
    return elapsed, rss_kib / 1024, p.stdout


def run(argv, env):
    """Runs one command; returns (seconds, peak RSS in MiB, requests)."""
    before = requests_so_far()
    elapsed, rss, _ = timed(argv, env)
    return elapsed, rss, requests_so_far() - before


def digest_tree(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.md5(f.read()).hexdigest()
    return out


def upload_all(src):
    subprocess.run(["s5cmd", "--endpoint-url", EP, "--log", "error", "--numworkers", "64", "cp", src + "/", f"s3://{BUCKET}/{PREFIX}/"], check=True)


def upload_some(src, paths, work):
    upload_some_to(src, paths, f"s3://{BUCKET}/{PREFIX}", work)


def upload_some_to(src, paths, url, work):
    """Uploads `paths` (relative to src) under `url` with one s5cmd run."""
    cmds = os.path.join(work, "s5cmd-cmds")
    with open(cmds, "w") as f:
        for p in paths:
            f.write(f'cp "{os.path.join(src, p)}" "{url}/{p}"\n')
    subprocess.run(["s5cmd", "--endpoint-url", EP, "--log", "error", "run", cmds], check=True)


def tree_arguments(doc):
    """The options every tree benchmark takes: its work dir, the tree's
    shape (gentree), and how many rounds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--big", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    return ap


def main():
    ap = tree_arguments(__doc__)
    ap.add_argument("--tools", default="fleetsync,s5cmd sync,rclone sync,aws s3 sync")
    a = ap.parse_args()

    os.makedirs(a.work, exist_ok=True)
    src = os.path.join(a.work, "src")
    gentree.generate(src, a.files, a.big, seed=1)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(src) for n in ns)
    subprocess.run(["aws", "--endpoint-url", EP, "s3", "mb", f"s3://{BUCKET}"], check=True, stdout=subprocess.DEVNULL)
    upload_all(src)
    print(f"tree: {a.files} files, {size / 2**20:.0f} MiB; {a.runs} runs per case; server: SeaweedFS on 127.0.0.1", flush=True)

    all_tools = tools(a.work)
    chosen = [t.strip() for t in a.tools.split(",")]
    results = {t: {"cold": [], "no-op": [], "1% changed": []} for t in chosen}
    trash = os.path.join(a.work, "trash")
    wrong = {t: set() for t in chosen}
    for r in range(a.runs):
        expected = digest_tree(src)
        for t in chosen:
            argv, env = all_tools[t]
            dest = os.path.join(a.work, "dest-" + t.replace(" ", "-"))
            set_aside(dest, trash)
            set_aside(dest + ".state", trash)
            os.makedirs(dest)
            for case in ("cold", "no-op"):
                results[t][case].append(run(argv(dest), env))
                if digest_tree(dest) != expected:
                    wrong[t].add(case)
                print(f"  round {r + 1} {t:12} {case:10} {results[t][case][-1][0]:7.2f} s", flush=True)
        changed = gentree.mutate(src, max(2, a.files // 100), seed=100 + r)
        upload_some(src, changed, a.work)
        expected = digest_tree(src)
        for t in chosen:
            argv, env = all_tools[t]
            dest = os.path.join(a.work, "dest-" + t.replace(" ", "-"))
            results[t]["1% changed"].append(run(argv(dest), env))
            got = digest_tree(dest)
            if got != expected:
                missed = sum(1 for p in changed if got.get(p) != expected[p])
                wrong[t].add(f"1% changed (missed {missed} of {len(changed)})")
            print(f"  round {r + 1} {t:12} {'1% changed':10} {results[t]['1% changed'][-1][0]:7.2f} s", flush=True)

    shutil.rmtree(trash, ignore_errors=True)
    print()
    print("| tool | case | median s | vs fleetsync | peak RSS MiB | requests | correct |")
    print("|---|---|---|---|---|---|---|")
    base = {c: statistics.median(x[0] for x in results["fleetsync"][c]) for c in results["fleetsync"]} if "fleetsync" in results else {}
    for t in chosen:
        for case, runs in results[t].items():
            med = statistics.median(x[0] for x in runs)
            rss = max(x[1] for x in runs)
            reqs = int(statistics.median(x[2] for x in runs))
            ratio = f"{med / base[case]:.2f}x" if base else "-"
            ok = "WRONG: " + ", ".join(sorted(w for w in wrong[t] if w.startswith(case))) if any(w.startswith(case) for w in wrong[t]) else "yes"
            print(f"| {t} | {case} | {med:.2f} | {ratio} | {rss:.0f} | {reqs} | {ok} |")
    if base:
        print()
        print("fleetsync against the fastest correct peer (target: cold <= 0.8, no-op <= 0.5, 1% <= 0.7):")
        for case in base:
            peers = [(statistics.median(x[0] for x in results[t][case]), t) for t in chosen if t != "fleetsync" and not any(w.startswith(case) for w in wrong[t])]
            if peers:
                best, who = min(peers)
                print(f"  {case:11} fleetsync {base[case]:.2f} s / {who} {best:.2f} s = {base[case] / best:.2f}")


if __name__ == "__main__":
    main()
