"""Errors a user can act on: each names the file (or config key) and what to do."""

from __future__ import annotations

import textwrap


class ShardError(Exception):
    """A problem with one input (a file, a split entry, a vocabulary).

    ``where`` names the file or key, ``problem`` says what is wrong and ``fix`` what to do.
    Other inputs of the same run still complete; the run exits non-zero.
    """

    def __init__(self, where: str, problem: str, fix: str):
        self.where, self.problem, self.fix = str(where), problem, fix
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        text = f"{self.where}: {self.problem} {self.fix}"
        return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)

    def to_json(self) -> dict:
        return {"where": self.where, "problem": self.problem, "fix": self.fix}
