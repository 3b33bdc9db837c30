#!/usr/bin/env python3
"""Generates a codebase-like tree for the demo and the benchmark.

Mostly small files (1-64 KiB, the size of PHP/JS/CSS sources) in nested
directories, plus a few large assets (1-20 MiB). Deterministic for a seed,
so every tool in a benchmark sees exactly the same tree.

    gentree.py DIR --files 10000 --big 20 --seed 1
    gentree.py DIR --mutate 100 --seed 2   # change 1% of an existing tree:
        half of the changes keep the file's size (what size-based sync misses)
"""
import argparse
import os
import random


def small_size(rng):
    # Skewed towards small files, as source trees are.
    return int(1024 * (1 + 63 * rng.random() ** 3))


def generate(root, files, big, seed):
    rng = random.Random(seed)
    top = ["app", "src", "vendor", "public", "config", "lib", "resources", "tests"]
    for i in range(files - big):
        depth = rng.randint(1, 4)
        parts = [rng.choice(top)] + [f"d{rng.randint(0, 9)}" for _ in range(depth)]
        ext = rng.choice([".php", ".js", ".css", ".html", ".json", ".twig", ".svg"])
        path = os.path.join(root, *parts, f"f{i}{ext}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rng.randbytes(small_size(rng)))
    for i in range(big):
        path = os.path.join(root, "public", "media", f"asset{i}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rng.randbytes(rng.randint(1, 20) * 1024 * 1024))


def mutate(root, count, seed):
    """Changes `count` files; returns their paths relative to root."""
    rng = random.Random(seed)
    paths = sorted(
        os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns
    )
    paths = [p for p in paths if os.path.getsize(os.path.join(root, p)) < 1 << 20]
    chosen = rng.sample(paths, count)
    for i, rel in enumerate(chosen):
        p = os.path.join(root, rel)
        with open(p, "rb") as f:
            data = bytearray(f.read())
        if i % 2 == 0:
            # Same size, different bytes.
            for j in range(0, len(data), max(1, len(data) // 8)):
                data[j] = (data[j] + 1 + rng.randrange(254)) % 256
        else:
            data += rng.randbytes(rng.randint(1, 512))
        with open(p, "wb") as f:
            f.write(data)
    return chosen


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--big", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutate", type=int, default=0)
    a = ap.parse_args()
    if a.mutate:
        for p in mutate(a.dir, a.mutate, a.seed):
            print(p)
    else:
        generate(a.dir, a.files, a.big, a.seed)
