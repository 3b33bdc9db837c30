#!/usr/bin/env python3
"""Times the release store (`fleetsync publish`, `fleetsync-agent pull
--releases`) against the peers moving the same tree as plain objects, and
against the physical bound, on the local S3 server.

Run through `infra/local/bench store`, which starts the server and builds
both binaries. One tree (`--files`, `--big`, as `infra/local/bench`) is
published to the store and copied as plain objects beside it; then, for
each of `--runs` rounds:

- publish: the whole tree into an empty store, then again unchanged (a
  no-op), against rclone and s5cmd uploading it as plain objects (a copy,
  then rclone's no-op `sync --checksum`);
- pull: a cold pull into an empty directory and a no-op pull, against
  rclone and s5cmd syncing the plain objects, and the bound: the same tree
  as one zstd-compressed tar from the same server, `curl | zstd -d | tar
  -x` into the same file system (and `tar -x` alone from a local tar; both
  also followed by `sync -f`, what fleetsync's one syncfs per switch costs);
  for publishing, the server's ingest: the same bytes as one tar object;
- 1% changed (half of them same-size edits): published as a new release,
  and pulled, against the peers syncing the changed plain objects.

Every result is checked against the source tree; requests and bytes sent
are counted from the server's own metrics (the store and the plain objects
live in buckets of their own). Prints medians, ratios, peak RSS, and each
of the issue's targets with its verdict.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import gentree  # noqa: E402

EP = os.environ["AWS_ENDPOINT_URL_S3"]
STORE, PLAIN, BOUND = "store", "plain", "bound"
AGENT = os.environ["FLEETSYNC_AGENT"]
BASTION = os.environ["FLEETSYNC_BASTION"]


def metrics(bucket):
    """(requests, PUT requests, bytes sent) for `bucket` so far."""
    text = urllib.request.urlopen(os.environ["FLEETSYNC_S3_METRICS"]).read().decode()
    reqs = puts = sent = 0
    for line in text.splitlines():
        if f'bucket="{bucket}"' not in line:
            continue
        value = int(float(line.rsplit(" ", 1)[1]))
        if line.startswith("SeaweedFS_s3_request_total{"):
            reqs += value
            puts += value if 'type="PUT"' in line else 0
        elif line.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total{"):
            sent += value
    return reqs, puts, sent


class Measure:
    """One command's figures: seconds, peak RSS MiB, requests, PUTs, bytes sent."""

    def __init__(self, argv, env=None, bucket=None, shell=False):
        # Every command starts with nothing dirty in the page cache: the
        # server's writes (a publish, the peers' uploads) would otherwise be
        # flushed by whichever command syncs next (fleetsync's syncfs, the
        # bound's `sync -f`) and be counted as its own.
        os.sync()
        before = metrics(bucket) if bucket else (0, 0, 0)
        self.seconds, self.rss, self.stdout = bench.timed(["bash", "-c", argv] if shell else argv, env or {})
        after = metrics(bucket) if bucket else (0, 0, 0)
        self.requests, self.puts, self.sent = (a - b for a, b in zip(after, before))


RCLONE = ["rclone", "--transfers", "64", "--checkers", "64", "--fast-list", "--checksum"]
S5CMD = ["s5cmd", "--endpoint-url", EP, "--numworkers", "64", "--log", "error"]


def publish(src, prefix, release=None):
    argv = [BASTION, "publish", src, "--source", f"s3://{STORE}/{prefix}", "--json"]
    return Measure(argv + (["--release-id", release] if release else []), bucket=STORE)


def pull(dest, prefix="main"):
    argv = [AGENT, "pull", f"s3://{STORE}/{prefix}", "--releases", "--dest", dest, "--state-dir", dest + ".state", "--json"]
    return Measure(argv, bucket=STORE)


PEERS = {
    "rclone sync": lambda d: (RCLONE + ["sync", f"local:{PLAIN}/tree", d], bench.rclone_env()),
    "s5cmd sync": lambda d: (S5CMD + ["sync", "--delete", f"s3://{PLAIN}/tree/*", d + "/"], {}),
}


def fresh(path, trash):
    bench.set_aside(path, trash)
    bench.set_aside(path + ".state", trash)
    os.makedirs(path)


def check(dest, expected, what, wrong):
    if bench.digest_tree(dest) != expected:
        wrong.add(what)


def median(xs):
    return statistics.median(xs)


def main():
    ap = bench.tree_arguments(__doc__)
    ap.add_argument("--peers", default="rclone,s5cmd", help="which peers to run (rclone is the ratios' base and always runs)")
    a = ap.parse_args()
    peers = {name: peer for name, peer in PEERS.items() if name == "rclone sync" or name.split()[0] in a.peers.split(",")}

    os.makedirs(a.work, exist_ok=True)
    src = os.path.join(a.work, "src")
    trash = os.path.join(a.work, "trash")
    gentree.generate(src, a.files, a.big, seed=1)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(src) for n in ns)
    for b in (STORE, PLAIN, BOUND):
        subprocess.run(["aws", "--endpoint-url", EP, "s3", "mb", f"s3://{b}"], check=True, stdout=subprocess.DEVNULL)
    print(f"tree: {a.files} files, {size / 2**20:.0f} MiB; {a.runs} runs per case; server: SeaweedFS on 127.0.0.1", flush=True)

    pub = {k: [] for k in ("fleetsync cold", "fleetsync no-op", "fleetsync 1%", "rclone cold", "rclone no-op", "s5cmd cold",
                           "bound: one tar, s5cmd cp") if k != "s5cmd cold" or "s5cmd sync" in peers}
    pulls = {k: {"cold": [], "no-op": [], "1% changed": []} for k in ["fleetsync"] + list(peers)}
    bounds = {k: [] for k in ("curl | zstd -d | tar -x", "curl | zstd -d | tar -x; sync -f", "tar -x", "tar -x; sync -f", "rclone sync; sync -f")}
    wrong = set()
    changed_counts = []

    # The published tree and its plain copy, which the pull rounds start from.
    m = publish(src, "main", "base")
    subprocess.run(S5CMD + ["cp", src + "/", f"s3://{PLAIN}/tree/"], check=True)

    for r in range(a.runs):
        # Publish: a whole tree into an empty store, then unchanged; the
        # peers' uploads of the same tree as plain objects.
        m = publish(src, f"cold{r}", "r0")
        pub["fleetsync cold"].append(m)
        m = publish(src, f"cold{r}")
        if not json.loads(m.stdout)["unchanged"]:
            wrong.add("publish no-op: not reported unchanged")
        pub["fleetsync no-op"].append(m)
        pub["rclone cold"].append(Measure(RCLONE + ["copy", src, f"local:{PLAIN}/up{r}"], bench.rclone_env(), bucket=PLAIN))
        pub["rclone no-op"].append(Measure(RCLONE + ["sync", src, f"local:{PLAIN}/up{r}"], bench.rclone_env(), bucket=PLAIN))
        if "s5cmd cold" in pub:
            pub["s5cmd cold"].append(Measure(S5CMD + ["cp", src + "/", f"s3://{PLAIN}/s5{r}/"], bucket=PLAIN))
        # The server's ingest: the same bytes as one object.
        tar = os.path.join(a.work, "tree.tar")
        subprocess.run(["tar", "-C", src, "-cf", tar, "."], check=True)
        pub["bound: one tar, s5cmd cp"].append(Measure(S5CMD + ["cp", tar, f"s3://{PLAIN}/up{r}.tar"], bucket=PLAIN))
        subprocess.run(S5CMD + ["rm", f"s3://{PLAIN}/up{r}.tar"], check=True, stdout=subprocess.DEVNULL)
        for p in [f"up{r}"] + ([f"s5{r}"] if "s5cmd cold" in pub else []):
            subprocess.run(S5CMD + ["rm", f"s3://{PLAIN}/{p}/*"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(S5CMD + ["rm", f"s3://{STORE}/cold{r}/*"], check=True, stdout=subprocess.DEVNULL)
        print(f"  round {r + 1} publish: fleetsync {pub['fleetsync cold'][-1].seconds:.2f} s cold, {pub['fleetsync no-op'][-1].seconds:.2f} s no-op;"
              f" rclone {pub['rclone cold'][-1].seconds:.2f} s", flush=True)

        # Pull: cold and no-op, fleetsync from the store, the peers from the plain copy.
        expected = bench.digest_tree(src)
        dest = os.path.join(a.work, "dest-fleetsync")
        fresh(dest, trash)
        for case in ("cold", "no-op"):
            pulls["fleetsync"][case].append(pull(dest))
            check(os.path.join(dest, "current"), expected, f"fleetsync {case}", wrong)
        for name, peer in peers.items():
            d = os.path.join(a.work, "dest-" + name.replace(" ", "-"))
            fresh(d, trash)
            for case in ("cold", "no-op"):
                argv, env = peer(d)
                pulls[name][case].append(Measure(argv, env, bucket=PLAIN))
                check(d, expected, f"{name} {case}", wrong)

        # The bound: one zstd tar from the same server, and tar -x alone.
        subprocess.run(["zstd", "-q", "-f", "-T0", "-3", tar, "-o", tar + ".zst"], check=True)
        subprocess.run(S5CMD + ["cp", tar + ".zst", f"s3://{BOUND}/tree.tar.zst"], check=True)
        url = subprocess.run(["aws", "--endpoint-url", EP, "s3", "presign", f"s3://{BOUND}/tree.tar.zst"],
                             check=True, capture_output=True, text=True).stdout.strip()
        for name in bounds:
            d = os.path.join(a.work, "dest-bound")
            fresh(d, trash)
            if name.startswith("curl"):
                extract = f"curl -sf '{url}' | zstd -d -q | tar -x -C '{d}'"
            elif name.startswith("rclone"):
                extract = " ".join(RCLONE + ["sync", f"local:{PLAIN}/tree", f"'{d}'"])
            else:
                extract = f"tar -x -f '{tar}' -C '{d}'"
            if name.endswith("sync -f"):
                extract += f" && sync -f '{d}'"
            bucket = PLAIN if name.startswith("rclone") else BOUND
            bounds[name].append(Measure(extract, env=bench.rclone_env(), shell=True, bucket=bucket))
            check(d, expected, f"bound {name}", wrong)

        # 1% changed: a new release and the changed plain objects.
        changed = gentree.mutate(src, max(2, a.files // 100), seed=100 + r)
        changed_counts.append(len(changed))
        bench.upload_some_to(src, changed, f"s3://{PLAIN}/tree", a.work)
        pub["fleetsync 1%"].append(publish(src, "main", f"r{r + 1}"))
        expected = bench.digest_tree(src)
        pulls["fleetsync"]["1% changed"].append(pull(dest))
        check(os.path.join(dest, "current"), expected, "fleetsync 1% changed", wrong)
        for name, peer in peers.items():
            d = os.path.join(a.work, "dest-" + name.replace(" ", "-"))
            argv, env = peer(d)
            pulls[name]["1% changed"].append(Measure(argv, env, bucket=PLAIN))
            check(d, expected, f"{name} 1% changed", wrong)
        f = pulls["fleetsync"]
        print(f"  round {r + 1} pull: fleetsync {f['cold'][-1].seconds:.2f} s cold, {f['no-op'][-1].seconds * 1000:.0f} ms no-op,"
              f" {f['1% changed'][-1].seconds:.2f} s 1%; rclone {pulls['rclone sync']['cold'][-1].seconds:.2f} s cold;"
              f" bound {bounds['curl | zstd -d | tar -x'][-1].seconds:.2f} s", flush=True)

    shutil.rmtree(trash, ignore_errors=True)
    report(a, size, pub, pulls, bounds, wrong, changed_counts, peers)


def report(a, size, pub, pulls, bounds, wrong, changed_counts, peers):
    sec = lambda ms: median(m.seconds for m in ms)  # noqa: E731
    req = lambda ms: int(median(m.requests for m in ms))  # noqa: E731
    print()
    print("publish | median s | vs rclone | requests | PUTs | peak RSS MiB")
    print("---|---|---|---|---|---")
    rclone = {"cold": sec(pub["rclone cold"]), "no-op": sec(pub["rclone no-op"])}
    for name, ms in pub.items():
        base = rclone["no-op"] if "no-op" in name else rclone["cold"]
        print(f"{name} | {sec(ms):.2f} | {sec(ms) / base:.2f}x | {req(ms)} | {int(median(m.puts for m in ms))} | {max(m.rss for m in ms):.0f}")
    print()
    print("pull | case | median s | vs fleetsync | requests | MiB sent | peak RSS MiB")
    print("---|---|---|---|---|---|---")
    fs = {case: sec(ms) for case, ms in pulls["fleetsync"].items()}
    for name, cases in pulls.items():
        for case, ms in cases.items():
            print(f"{name} | {case} | {sec(ms):.3f} | {sec(ms) / fs[case]:.2f}x | {req(ms)} | {median(m.sent for m in ms) / 2**20:.1f} | {max(m.rss for m in ms):.0f}")
    for name, ms in bounds.items():
        label = name if name.startswith("rclone") else f"bound: {name}"
        print(f"{label} | cold | {sec(ms):.3f} | {sec(ms) / fs['cold']:.2f}x | {req(ms)} | {median(m.sent for m in ms) / 2**20:.1f} | -")

    changed = int(median(changed_counts))
    cold, noop, one = (pulls["fleetsync"][c] for c in ("cold", "no-op", "1% changed"))
    best_peer_1pct = min(sec(pulls[p]["1% changed"]) for p in peers)
    targets = [
        ("cold pull <= 0.4x rclone's", sec(cold) / sec(pulls["rclone sync"]["cold"]), 0.4),
        ("  (made as durable as fleetsync's, which syncs before it switches: <= 0.4x `rclone sync; sync -f`)",
         sec(cold) / sec(bounds["rclone sync; sync -f"]), 0.4),
        ("cold pull <= 2x the bound (curl | zstd -d | tar -x)", sec(cold) / sec(bounds["curl | zstd -d | tar -x"]), 2.0),
        ("no-op pull: requests == 1", max(m.requests for m in noop), 1),
        (f"1% pull: requests <= changed ({changed}) + 3", req(one), changed + 3),
        ("1% pull ahead of every peer (s / fastest peer's)", sec(one) / best_peer_1pct, 1.0),
        ("publish cold <= 0.3x rclone's upload", sec(pub["fleetsync cold"]) / rclone["cold"], 0.3),
        (f"publish 1%: PUTs <= changed ({changed}) + 3", int(median(m.puts for m in pub["fleetsync 1%"])), changed + 3),
        ("publish no-op: requests <= 2", max(m.requests for m in pub["fleetsync no-op"]), 2),
        ("publish no-op <= 0.5x rclone's no-op sync", sec(pub["fleetsync no-op"]) / rclone["no-op"], 0.5),
    ]
    if a.files <= 10000:
        # The target is for the 10,000-file tree: the no-op stats
        # every live file (about 4 us each).
        targets.insert(4, ("no-op pull < 50 ms", sec(noop) * 1000, 50))
    if a.files >= 100000:
        targets.append(("peak RSS of the cold pull < 200 MiB", max(m.rss for m in cold), 200))
    print()
    print(f"targets ({a.files} files, {size / 2**20:.0f} MiB; cold pull sent {median(m.sent for m in cold) / 2**20:.1f} MiB on the wire):")
    for what, got, limit in targets:
        verdict = "ok" if got <= limit else "MISSED"
        print(f"  {verdict:6} {what}: {got:.2f} (limit {limit})" if isinstance(got, float) else f"  {verdict:6} {what}: {got} (limit {limit})")
    ingest = sec(pub["fleetsync cold"]) / sec(pub["bound: one tar, s5cmd cp"])
    print(f"  info   publish cold against the server's ingest (the same bytes as one object): {ingest:.2f}x")
    print("correct: " + ("every result matched the source" if not wrong else "WRONG: " + ", ".join(sorted(wrong))))
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
