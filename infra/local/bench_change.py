#!/usr/bin/env python3
"""Work proportional to the change: a 1% change and a no-op in release mode.

Run through `infra/local/bench change`, which starts the S3 server and
builds both binaries. One tree (`--files`, default 100,000 small files) is
published and pulled cold, and pulled again (which stages the next
release); then, for each of `--runs` rounds, 1% of its files change (half
of them same-size edits), a new release is published, and the node pulls
it; then three no-op pulls: one right after (which checks the new release
and stages the next), one within `--verify-every` (trusted), one after it
(the full drift check, a stat per file). Each pull runs at normal priority, with
nothing dirty in the page cache when it starts.

Printed side by side, medians:
- the 1% pull: when the new release went live (`durations.live_after_ms`
  in the agent's report: from its start to the switch of `current`) and
  when the pull exited; then the pull after it (as the timer's pull after
  a deploy: the full drift check of the new release, and staging the next
  one), which no deploy waits for;
- the bounds: `cp -al` of the live tree on the same disk (what linking the
  unchanged files costs; a 1% pull without a staged copy costs about
  that), and the changed bytes alone: the changed files copied into an
  empty directory from a local copy, then `sync -f`;
- the no-ops: trusted (within `--verify-every`) and with the full check.
Every result is compared with the source tree.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import gentree  # noqa: E402

EP = os.environ["AWS_ENDPOINT_URL_S3"]
AGENT = os.environ["FLEETSYNC_AGENT"]
BASTION = os.environ["FLEETSYNC_BASTION"]
BUCKET = "change"
VERIFY_EVERY = 20


def run(argv, **kw):
    """Runs `argv` with nothing dirty in the page cache; (seconds, stdout)."""
    os.sync()
    t = time.monotonic()
    out = subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout
    return time.monotonic() - t, out


def pull(dest):
    argv = [AGENT, "pull", f"s3://{BUCKET}/app", "--releases", "--dest", dest, "--state-dir", dest + ".state",
            "--priority", "normal", "--verify-every", f"{VERIFY_EVERY}s", "--json"]
    seconds, out = run(argv)
    return seconds, json.loads(out)


def main():
    ap = bench.tree_arguments(__doc__)
    ap.set_defaults(files=100000, big=0, runs=3)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    src, dest = os.path.join(a.work, "src"), os.path.join(a.work, "dest")
    gentree.generate(src, a.files, a.big, seed=1)
    subprocess.run(["aws", "--endpoint-url", EP, "s3", "mb", f"s3://{BUCKET}"], check=True, stdout=subprocess.DEVNULL)
    run([BASTION, "publish", src, "--source", f"s3://{BUCKET}/app", "--release-id", "r0", "--json"])
    cold, _ = pull(dest)
    pull(dest)
    print(f"tree: {a.files} files; cold pull {cold:.2f} s; {a.runs} rounds", flush=True)
    wrong = []
    rows = {k: [] for k in ("live", "exit", "cp -al", "bytes", "stage", "checked no-op", "trusted no-op")}
    staged = []
    for r in range(a.runs):
        changed = gentree.mutate(src, max(2, a.files // 100), seed=100 + r)
        run([BASTION, "publish", src, "--source", f"s3://{BUCKET}/app", "--release-id", f"r{r + 1}", "--json"])
        seconds, rep = pull(dest)
        rows["live"].append(rep["durations"].get("live_after_ms", 0) / 1000)
        rows["exit"].append(seconds)
        staged.append(bool(rep["release"].get("staged")))
        if bench.digest_tree(os.path.join(dest, "current")) != bench.digest_tree(src):
            wrong.append(f"round {r + 1}: the 1% pull")
        # The bounds, on the same disk.
        copy = os.path.join(a.work, "cpal")
        rows["cp -al"].append(run(["cp", "-al", os.path.join(dest, "current") + "/", copy])[0])
        shutil.rmtree(copy)
        only = os.path.join(a.work, "bytes")
        os.sync()
        t = time.monotonic()
        for k in changed:
            os.makedirs(os.path.join(only, os.path.dirname(k)), exist_ok=True)
            shutil.copyfile(os.path.join(src, k), os.path.join(only, k))
        subprocess.run(["sync", "-f", only], check=True)
        rows["bytes"].append(time.monotonic() - t)
        shutil.rmtree(only)
        # The no-ops: the first after the switch checks the release built
        # from the staged copy (and stages the next one, as the timer's pull
        # does after a deploy); the next within --verify-every trusts it.
        seconds, rep = pull(dest)
        rows["stage"].append(seconds)
        rows["trusted no-op"].append(pull(dest)[0])
        time.sleep(VERIFY_EVERY)
        rows["checked no-op"].append(pull(dest)[0])
        print(f"  round {r + 1}: live after {rows['live'][-1]:.3f} s, exited after {rows['exit'][-1]:.2f} s"
              f" (staged: {staged[-1]}); the pull after it (check, stage) {rows['stage'][-1]:.2f} s; cp -al {rows['cp -al'][-1]:.2f} s; changed bytes {rows['bytes'][-1]:.3f} s;"
              f" no-op {rows['checked no-op'][-1] * 1000:.0f} ms checked, {rows['trusted no-op'][-1] * 1000:.0f} ms trusted",
              flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print()
    print(f"| {a.files} files, 1% changed | s | vs `cp -al` |")
    print("|---|---|---|")
    for name, key in (("fleetsync: live (switched)", "live"), ("fleetsync: the deploy's pull exited", "exit"),
                      ("fleetsync: the pull after it (the timer's: check, then stage the next)", "stage"),
                      ("bound: `cp -al` of the tree", "cp -al"), ("bound: the changed bytes alone, then `sync -f`", "bytes")):
        print(f"| {name} | {med[key]:.3f} | {med[key] / med['cp -al']:.2f}x |")
    print()
    print(f"| no-op of {a.files} files | ms |")
    print("|---|---|")
    print(f"| full drift check (first pull after --verify-every) | {med['checked no-op'] * 1000:.0f} |")
    print(f"| trusted (within --verify-every) | {med['trusted no-op'] * 1000:.0f} |")
    print()
    targets = [("1% change live <= 0.5 s", med["live"], 0.5), ("no-op < 50 ms", med["trusted no-op"], 0.05)]
    for name, got, limit in targets:
        print(f"{name}: {got:.3f} -> {'met' if got <= limit else 'NOT met'}")
    print(f"every 1% pull built from the staged copy: {all(staged)}")
    print("correct: " + ("yes" if not wrong else "NO: " + ", ".join(wrong)))


if __name__ == "__main__":
    main()
