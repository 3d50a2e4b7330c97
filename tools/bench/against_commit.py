#!/usr/bin/env python
"""The loader of this tree against the same loader at an earlier commit, in one run (a benchmark,
not a test): did a change lose cells/s?

    .venv/bin/python tools/bench/against_commit.py REF PROJECT [--ref-project P] [--repeats 3]

Each side runs tools/bench/peers.py's `tok_ours` (tokenized training batches) and `raw_ours`
(raw minibatches in the shards' dtypes) tasks from its own tree: REF checked out as a git worktree
under WORKDIR (its peers.py and its package first on sys.path), this tree from here. PROJECT is
read by this tree; REF reads --ref-project when given (e.g. the same source sharded in the format
REF wrote). 0 and 2 workers, rounds alternating (ref, this, ref, this ...), medians, the machine's
load per run; the last line printed is one JSON object with every figure. The worktree stays
for the next run: `git worktree remove WORKDIR/ref_<sha>` when done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (the tasks, the measuring wrapper, medians)

REPO = Path(__file__).resolve().parents[2]


def worktree(ref: str, workdir: Path) -> Path:
    """REF checked out (detached) at WORKDIR/ref_<sha>, made once."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    path = workdir / f"ref_{sha[:10]}"
    if not (path / ".git").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha], check=True)
    return path


def run(tree: Path, task: str, kwargs: dict, n_rows: int, workdir: Path) -> dict:
    """One task of TREE's peers.py in a fresh process (peers.child: wall, peak RSS, the load)."""
    return peers.child(sys.executable, task, kwargs, n_rows, workdir, tree / "tools" / "bench" / "peers.py")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="the earlier commit (anything git rev-parse reads)")
    p.add_argument("project", help="the project this tree reads")
    p.add_argument("--ref-project", help="the project REF reads (default: PROJECT)")
    p.add_argument("--cells", type=int, default=200_000, help="the project's cells (the shuffle check)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--workdir", default="/tmp/concept_peers_bench")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sides = {"ref": (worktree(args.ref, workdir), args.ref_project or args.project), "this": (REPO, args.project)}
    for tree, project in sides.values():  # numba compiles each tree's kernels once, outside the rounds
        run(tree, "raw_ours", {"project": project, "seconds": 0.5, "workers": 0}, args.cells, workdir)
        run(tree, "tok_ours", {"project": project, "seconds": 0.5, "workers": 0}, args.cells, workdir)
    runs: dict[str, list] = {}
    for rnd in range(args.repeats):
        for task in ("tok_ours", "raw_ours"):
            for w in (0, 2):
                for side, (tree, project) in sides.items():
                    kw = {"project": project, "seconds": args.seconds, "workers": w}
                    res = run(tree, task, kw, args.cells, workdir)
                    runs.setdefault(f"{task}/{w}/{side}", []).append(res)
                    peers.log(f"  round {rnd + 1} {task} {w} workers {side}: {peers.fmt_rate(res)}")
    result = {k: peers.medians(v) for k, v in runs.items()}
    print(f"\n{'loader':<10} {'workers':>7} {'ref cells/s':>12} {'this cells/s':>13} {'ratio':>6}")
    for task in ("tok_ours", "raw_ours"):
        for w in (0, 2):
            a, b = (peers.rate(result[f"{task}/{w}/{s}"]) for s in ("ref", "this"))
            print(f"{task:<10} {w:>7} {a or 0:>12,.0f} {b or 0:>13,.0f} {peers.ratio(b, a) or 0:>6.2f}")
    print(json.dumps({"ref": args.ref, "runs": result}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
