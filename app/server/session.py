"""The review screen's per-session state, kept in ``gr.State`` (persistent state is in DuckDB only).

A ``Session`` is immutable: every review handler returns a new one (``dataclasses.replace``) inside
the ``View`` it returns, and the wiring stores it back in the ``gr.State``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DayCounts:
    """Today's counters of one annotator, shown in the progress line."""

    labels: int = 0
    """decisions (not skips) submitted today, undone ones excluded"""
    skips: int = 0
    """skips submitted today, undone ones excluded"""
    active_seconds: float = 0.0
    """active time spent on today's labels and skips"""

    @classmethod
    def from_row(cls, row: dict) -> DayCounts:
        """From ``storage``'s ``annotator_day`` row {labels, skips, active_seconds}."""
        return cls(int(row["labels"] or 0), int(row["skips"] or 0), float(row["active_seconds"] or 0))

    def add(self, kind: str, active_seconds: float | None) -> DayCounts:
        """The counters after one more submission of ``kind`` (a decision kind, or ``skip``)."""
        skipped = kind == "skip"
        return replace(self, labels=self.labels + (0 if skipped else 1), skips=self.skips + (1 if skipped else 0),
                       active_seconds=self.active_seconds + (active_seconds or 0))


@dataclass(frozen=True)
class OnScreen:
    """The item on screen: what the next submit, confirm or skip refers to."""

    round_id: int
    prompt_id: str
    candidate_ids: tuple[str, ...]
    """in display order: answer #1 is ``candidate_ids[0]``"""
    ai_pair: dict | None
    """the pair the AI would build ({judge, chosen_id, rejected_id, margin, chosen_index, rejected_index}), which
    "Confirm AI pair" records; None when fewer than two answers are scored"""
    served_at: float
    """when it was served (POSIX seconds of the app's clock): caps the active time counted for it"""


@dataclass(frozen=True)
class Session:
    """One browser session (or API client session) of the review screen."""

    item: OnScreen | None = None
    """the item on screen; None before the first one and when the queue is empty"""
    history: tuple[int, ...] = ()
    """label ids submitted in this session, oldest first (the last ``HISTORY``): undo pops the newest"""
    day: DayCounts | None = None
    """today's counters: read from the database once per session, then kept up to date here"""
    parked: int | None = None
    """items this user still holds a claim on that come before a fresh claim: None on a fresh session (a
    reload or a second tab: a held item always comes first), else how many an undo left parked"""
