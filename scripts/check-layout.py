#!/usr/bin/env python3
"""Keeps the node's crate graph pointing one way (see ARCHITECTURE.md, "Crate layout").

Reads `cargo metadata` and fails when a workspace crate depends on a SignalOps crate it may
not use, or reaches (directly or through any dependency) a heavy crate that its layer must not
pull in, such as the WASM runtime in the store or NATS in the shared types. Dev-dependencies
(tests) and build-dependencies are not counted.

Usage: scripts/check-layout.py  (exit 0: the layout holds; exit 1: what broke it, one per line)
"""
import json
import subprocess
import sys

# Each crate and the SignalOps crates it may depend on. A crate may only use crates listed
# before it, so the graph has no cycles and no back-edges.
ALLOWED = {
    "signalops-core": [],
    "signalops-store": ["signalops-core"],
    "signalops-plugins": ["signalops-core"],
    "signalops-rules": ["signalops-core", "signalops-plugins"],
    "signalops-notify": ["signalops-core", "signalops-store", "signalops-plugins", "signalops-rules"],
    "signalops-control": ["signalops-core", "signalops-plugins", "signalops-notify", "signalops-rules"],
    "signalops-node": [
        "signalops-core",
        "signalops-store",
        "signalops-plugins",
        "signalops-notify",
        "signalops-rules",
        "signalops-control",
    ],
    # The guest SDK is built for wasm32 with an old compiler: it stands apart.
    "signalops-sdk": [],
}

# External crates a layer must not reach, even transitively.
RUNTIMES = ["wasmtime", "async-nats", "fjall", "openraft", "redb", "reqwest", "lettre", "minijinja", "axum", "hyper"]
FORBIDDEN = {
    "signalops-core": RUNTIMES + ["tokio"],
    "signalops-store": ["wasmtime", "async-nats", "openraft", "redb", "reqwest", "lettre", "minijinja", "axum"],
    "signalops-plugins": ["fjall", "openraft", "redb", "reqwest", "lettre", "minijinja", "axum"],
    "signalops-rules": ["fjall", "openraft", "redb", "reqwest", "lettre", "axum", "hyper"],
    "signalops-notify": ["openraft", "redb", "axum"],
    "signalops-control": ["axum"],
}


def host_triple() -> str:
    info = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in info.splitlines() if line.startswith("host: "))


def main() -> int:
    # This machine's platform only: the graph is the same on every platform we build for, and
    # other platforms' crates need not be downloaded.
    cmd = ["cargo", "metadata", "--format-version", "1", "--filter-platform", host_triple()]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print(f"layout: {' '.join(cmd)} failed:\n{run.stderr}", file=sys.stderr)
        return 1
    out = run.stdout
    meta = json.loads(out)
    names = {p["id"]: p["name"] for p in meta["packages"]}
    members = {names[i] for i in meta["workspace_members"]}
    normal = {}
    for node in meta["resolve"]["nodes"]:
        deps = []
        for d in node["deps"]:
            if any(k["kind"] is None for k in d["dep_kinds"]):
                deps.append(d["pkg"])
        normal[node["id"]] = deps
    by_name = {names[i]: i for i in meta["workspace_members"]}

    problems = []
    for crate in sorted(members):
        if crate not in ALLOWED:
            problems.append(f"{crate}: not in the layout (add it to ALLOWED in scripts/check-layout.py)")
            continue
        direct = {names[d] for d in normal[by_name[crate]]}
        for dep in sorted(direct & members):
            if dep not in ALLOWED[crate]:
                problems.append(f"{crate} depends on {dep}, which it may not use (allowed: {ALLOWED[crate] or 'none'})")
        # Everything it reaches through normal dependencies.
        seen, stack = set(), [by_name[crate]]
        while stack:
            for d in normal[stack.pop()]:
                if d not in seen:
                    seen.add(d)
                    stack.append(d)
        reached = {names[d] for d in seen}
        for bad in FORBIDDEN.get(crate, []):
            if bad in reached:
                problems.append(f"{crate} reaches {bad}, which its layer must not pull in")
    for p in problems:
        print(f"layout: {p}", file=sys.stderr)
    if not problems:
        print(f"layout: {len(members)} crates, dependencies point one way")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
