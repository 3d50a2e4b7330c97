"""Handing batches to the trainer: the resumable loader over DataLoader workers (loader), the
shared-memory hand-off out of the workers (handoff), the worker count (workers)."""
