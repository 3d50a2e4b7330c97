"""Run a training loader in a fresh process (used by the resumption and kill tests).

    python data_run.py PROJECT OUT.pt --take N [--state-in S.json] [--state-out S.json [--state-at K]]
                       [--sleep-after K] [override ...]

Saves every tensor of the N batches delivered to OUT.pt; with --state-in the loader resumes from
that state; --state-out writes the state after the N batches, or with --state-at K after the first
K of them (taken while the loader goes on: its workers hold batches beyond K); --sleep-after K
sleeps forever after K batches (to be killed).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers.py
from helpers import data_module  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("project")
    p.add_argument("out")
    p.add_argument("--take", type=int, required=True)
    p.add_argument("--state-in")
    p.add_argument("--state-out")
    p.add_argument("--state-at", type=int)
    p.add_argument("--sleep-after", type=int)
    args, overrides = p.parse_known_args()
    loader = data_module(Path(args.project), overrides).train_loader()
    if args.state_in:
        loader.load_state_dict(json.loads(Path(args.state_in).read_text()))
    batches = []
    state_at = args.state_at if args.state_at is not None else args.take
    for i, batch in enumerate(loader):
        batches.append({k: v.clone() for k, v in batch.tensors().items()} | {"index": batch.index})
        if args.state_out and len(batches) == state_at:
            Path(args.state_out).write_text(json.dumps(loader.state_dict()))
        if args.sleep_after is not None and i + 1 == args.sleep_after:
            print("READY", flush=True)
            time.sleep(3600)
        if len(batches) == args.take:
            break
    torch.save(batches, args.out)


if __name__ == "__main__":
    main()
