"""Errors a user can act on: each names the file (or config key), what is wrong and what to do.

`UserError` is the one base every program catches and prints as a paragraph (exit 2), so no
layer re-wraps another's error. The subclasses say which contract was broken:

    ConfigError    the composed config (a file that is not YAML, an unknown group, a bad value)
    ShardError     one input of `concept-shard` (a source file, a split entry, a vocabulary)
    StorageError   the shard store itself (an S3 bucket, credentials, an endpoint)
    DataError      the data pipeline at start-up (concept_train.data: missing shards, panels, ...)
    TrainError     a run (concept_train.trainer: run ids, checkpoints, models, embeddings)

Everything lives here because `concept_train` imports `concept_shard`, never the reverse.
"""

from __future__ import annotations

import textwrap


class UserError(Exception):
    """A problem the user can fix: ``where`` names the file or key, ``problem`` says what is wrong
    and ``fix`` what to do."""

    def __init__(self, where: str, problem: str, fix: str):
        self.where, self.problem, self.fix = str(where), problem, fix
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        text = f"{self.where}: {self.problem} {self.fix}"
        return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)

    def to_json(self) -> dict:
        return {"where": self.where, "problem": self.problem, "fix": self.fix}


class ConfigError(UserError):
    """The config cannot be composed, or one of its values cannot be used."""


class ShardError(UserError):
    """A problem with one input of sharding (a file, a split entry, a vocabulary). Other inputs of
    the same build still complete; the build exits non-zero."""


class StorageError(UserError):
    """The shard store cannot be reached or used (object-store bucket, credentials, endpoint)."""


class DataError(UserError):
    """A problem with the data a training run would read, found before training starts (missing or
    stale shards, a bad panel CSV, a batch size the ranks cannot share)."""


class TrainError(UserError):
    """A run that cannot start or a model that cannot be loaded as asked (which run, which
    checkpoint, which key, what to do)."""
