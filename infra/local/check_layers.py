#!/usr/bin/env python3
"""Fails when a crate's top-level modules import each other in a circle.

The library reads bottom-up (store and file system, then pull and
release, then publish) and the bastion too (collect, report, progress,
trigger, deploy): each module above what it uses. A `use crate::a` in `b`
and a `use crate::b` in `a` (directly or through others) is a circle: a
shared piece then needs one home on a lower floor. Run by infra/local/test.

    check_layers.py [CRATE_SRC_DIR ...]   # default: src bastion/src agent/src
"""
import collections
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def edges_of(src):
    """Top-level module -> the crate's other top-level modules it names."""
    files = collections.defaultdict(list)
    for dirpath, _, names in os.walk(src):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                files[os.path.relpath(path, src).split(os.sep)[0].removesuffix(".rs")].append(path)
    tops = set(files)
    edges = collections.defaultdict(set)
    for top, paths in files.items():
        for path in paths:
            text = open(path).read()
            # Unit tests may reach anywhere.
            text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
            named = set(re.findall(r"crate::([a-z_][a-z0-9_]*)", text))
            for group in re.findall(r"use crate::\{([^;]*)\};", text, flags=re.S):
                named |= set(re.findall(r"(?:^|[\s,{])([a-z_][a-z0-9_]*)(?=::|\s*[,}]|\s*$)", group))
            edges[top] |= {n for n in named if n in tops and n != top}
    return tops, edges


def circles(tops, edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(tops):
        if v not in index:
            visit(v)
    return out


def main():
    srcs = sys.argv[1:] or [os.path.join(ROOT, d) for d in ("src", "bastion/src", "agent/src")]
    bad = 0
    for src in srcs:
        tops, edges = edges_of(src)
        for comp in circles(tops, edges):
            bad += 1
            detail = "; ".join(f"{m} uses {', '.join(sorted(edges[m] & set(comp)))}" for m in comp)
            print(f"check_layers: {os.path.relpath(src, ROOT)}: modules import each other in a circle: {detail}", file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"check_layers: {len(srcs)} crates, no import circles", file=sys.stderr)


if __name__ == "__main__":
    main()
