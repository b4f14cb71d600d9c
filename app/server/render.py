"""Safe HTML for the review screen: every value from the database passes through ``html.escape``.

Questions, answers, judge reasoning, ids and reasons are text, never markup: ``<script>`` or
``<img onerror=...>`` in a model answer shows up as those characters. Only this module writes HTML
tags, and only around escaped values. A judge's scores keep their own shape, picked from ``SHAPES``
(five 0-4 rubric bars, a 0-100 score, pairwise wins) by what the judgment row holds.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from app.server.session import DayCounts

METRICS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
DISAGREE_AT = 0.5
"""Two judges whose normalised `overall` for one candidate differ by at least this get a mark."""
DEMO_NOTE = "The demo model does not really see images: its answers are fluent text, not descriptions of the picture."

KEYS_HELP = (("1-k", "chosen"), ("Shift+1-k", "rejected"), ("Enter", "submit"), ("A", "confirm AI pair"),
             ("S", "skip"), ("X", "all bad"), ("B / Backspace", "undo last"), ("Z", "zoom image"))


def esc(value: object) -> str:
    """Escaped text of any value (None -> empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


@dataclass
class JudgeScores:
    """One judge's latest scores for one candidate, as the screen needs them."""

    judge: str
    overall: float | None = None
    score: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    reasoning: str | None = None
    wins: int = 0
    losses: int = 0
    ties: int = 0
    pairwise: bool = False


# ------------------------------------------------------------------------------------------- judge shapes

def _bar(value: float | None, top: float, label: str, shown: str | None = None) -> str:
    if value is None:
        return f'<div class="pf-bar"><span class="pf-bar-label">{esc(label)}</span><span class="pf-na">n/a</span></div>'
    pct = max(0.0, min(100.0, 100.0 * float(value) / top))
    shown = f"{float(value):g}" if shown is None else shown
    return (f'<div class="pf-bar" title="{esc(label)} {esc(shown)}">'
            f'<span class="pf-bar-label">{esc(label)}</span>'
            f'<span class="pf-bar-track"><span class="pf-bar-fill" style="width:{pct:.0f}%"></span></span>'
            f'<span class="pf-bar-value">{esc(shown)}</span></div>')


def _rubric(s: JudgeScores) -> str:
    return "".join(_bar(s.metrics.get(m), 4.0, m, None if s.metrics.get(m) is None else f"{s.metrics[m]:g}/4")
                   for m in METRICS)


def _score(s: JudgeScores) -> str:
    """A judge-native scalar (e.g. 0-100 pointwise); the bar shows the normalised overall."""
    shown = f"{s.score:g}" if s.score is not None else None
    return _bar(s.overall, 1.0, "score", shown)


def _pairwise(s: JudgeScores) -> str:
    r = f" (r = {s.score:g})" if s.score is not None else ""
    return (f'<div class="pf-pairwise">wins <b>{s.wins}</b> · losses <b>{s.losses}</b> · ties <b>{s.ties}</b>'
            f'{esc(r)}</div>')


SHAPES: dict[str, Callable[[JudgeScores], str]] = {"rubric": _rubric, "pairwise": _pairwise, "score": _score}


def shape_of(s: JudgeScores) -> str:
    if any(s.metrics.get(m) is not None for m in METRICS):
        return "rubric"
    if s.pairwise:
        return "pairwise"
    return "score"


def _judge_cell(s: JudgeScores, disagree: bool) -> str:
    cls = "pf-judge pf-disagree" if disagree else "pf-judge"
    mark = ('<span class="pf-mark" title="judges differ by at least '
            f'{DISAGREE_AT:g} on this answer">&#9888; judges disagree</span>') if disagree else ""
    overall = f"{s.overall:.2f}" if s.overall is not None else "n/a"
    reasoning = (f'<details class="pf-reasoning"><summary>reasoning</summary><div class="pf-text">{esc(s.reasoning)}'
                 f'</div></details>') if s.reasoning else ""
    return (f'<div class="{cls}" data-judge="{esc(s.judge)}"><div class="pf-judge-head"><b>{esc(s.judge)}</b> '
            f'<span class="pf-overall">overall {esc(overall)}</span> {mark}</div>'
            f'{SHAPES[shape_of(s)](s)}{reasoning}</div>')


# ------------------------------------------------------------------------------------------- the item

def image_url(abs_path: str) -> str:
    """URL of a workspace image on Gradio's file route (relative, so a proxy's root path still works)."""
    return "gradio_api/file=" + quote(abs_path)


def disagreements(scores: dict[str, dict[str, JudgeScores]], threshold: float = DISAGREE_AT) -> set[str]:
    """Candidate ids where two judges' `overall` differ by at least ``threshold``."""
    out = set()
    for cid, by_judge in scores.items():
        vals = [s.overall for s in by_judge.values() if s.overall is not None]
        if len(vals) >= 2 and max(vals) - min(vals) >= threshold - 1e-9:
            out.add(cid)
    return out


def item_html(*, question: str, image_src: str | None, candidates: list[dict], scores: dict[str, dict[str, JudgeScores]],
              ai_pair: dict | None, demo_model: bool, reference: str | None = None, round_id: int | None = None,
              prompt_id: str | None = None, note: str | None = None) -> str:
    """The review item: image (click to zoom), question, k candidate cards with every judge's scores."""
    parts = ['<div class="pf-item" id="pf-item">']
    if demo_model:
        parts.append(f'<div class="pf-demo-note">{esc(DEMO_NOTE)}</div>')
    if note:
        parts.append(f'<div class="pf-note">{esc(note)}</div>')
    parts.append('<div class="pf-top">')
    if image_src:
        parts.append(f'<div class="pf-image" title="click (or Z) to zoom"><img src="{esc(image_src)}" alt="prompt image">'
                     f'<a class="pf-open" href="{esc(image_src)}" target="_blank" rel="noopener">open full size</a></div>')
    parts.append(f'<div class="pf-question"><div class="pf-meta">round {esc(round_id)} · prompt {esc(prompt_id)}</div>'
                 f'<div class="pf-text pf-q">{esc(question)}</div>')
    if reference:
        parts.append(f'<details class="pf-ref"><summary>reference answer</summary><div class="pf-text">{esc(reference)}'
                     f'</div></details>')
    if ai_pair:
        parts.append(f'<div class="pf-ai-summary">AI pair ({esc(ai_pair["judge"])}): '
                     f'<b>#{ai_pair["chosen_index"] + 1}</b> over <b>#{ai_pair["rejected_index"] + 1}</b>, margin '
                     f'{ai_pair["margin"]:.2f} — press <kbd>A</kbd> to confirm</div>')
    else:
        parts.append('<div class="pf-ai-summary">no AI pair (fewer than two scored answers)</div>')
    parts.append("</div></div>")
    marked = disagreements(scores)
    for i, c in enumerate(candidates):
        cid = c["candidate_id"]
        cls, badge = "pf-cand", ""
        if ai_pair and cid == ai_pair["chosen_id"]:
            cls, badge = "pf-cand pf-ai-chosen", '<span class="pf-badge pf-badge-chosen">AI chosen</span>'
        elif ai_pair and cid == ai_pair["rejected_id"]:
            cls, badge = "pf-cand pf-ai-rejected", '<span class="pf-badge pf-badge-rejected">AI rejected</span>'
        origin = "" if c.get("origin") == "policy" and c.get("view", "original") == "original" else \
            f'<span class="pf-origin">{esc(c.get("origin"))} · {esc(c.get("view"))}</span>'
        judges = "".join(_judge_cell(s, cid in marked) for _, s in sorted(scores.get(cid, {}).items()))
        parts.append(f'<div class="{cls}" data-candidate="{esc(cid)}"><div class="pf-cand-head">'
                     f'<span class="pf-num">#{i + 1}</span> {badge} {origin}</div>'
                     f'<div class="pf-text pf-answer">{esc(c.get("text"))}</div>'
                     f'<div class="pf-judges">{judges or "<span class=pf-na>no judgments yet</span>"}</div></div>')
    parts.append("</div>")
    return "".join(parts)


def empty_html(message: str, demo_model: bool = False) -> str:
    note = f'<div class="pf-demo-note">{esc(DEMO_NOTE)}</div>' if demo_model else ""
    return f'<div class="pf-item pf-empty" id="pf-item">{note}<p>{esc(message)}</p></div>'


def keys_html() -> str:
    return '<div class="pf-keys">' + " · ".join(f"<kbd>{esc(k)}</kbd> {esc(v)}" for k, v in KEYS_HELP) + "</div>"


def progress_html(user: str, role: str, rnd: dict, day: DayCounts) -> str:
    """The progress line: who is signed in, the round's counts (``rnd``), today's counters."""
    mins = float(day.active_seconds or 0) / 60.0
    return (f'<div class="pf-progress"><span>signed in as <b>{esc(user)}</b> ({esc(role)})</span>'
            f'<span>round: <b>{esc(rnd.get("labelled", 0))}</b> of {esc(rnd.get("queued", 0))} prompts labelled, '
            f'{esc(rnd.get("complete", 0))} complete, {esc(rnd.get("live_claims", 0))} being reviewed</span>'
            f'<span>your day: <b>{esc(day.labels)}</b> labels, {esc(day.skips)} skips, '
            f'{mins:.1f} active min</span></div>')
