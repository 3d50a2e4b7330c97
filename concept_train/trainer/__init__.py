"""The training loop (loop.py) and what it relies on: process groups (distributed.py), optimizer and
schedules (optim.py), checkpoints (checkpoint.py), validation (validate.py), metrics (metrics.py)."""
