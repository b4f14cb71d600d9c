"""prefloop agreement: rank correlation and best/worst agreement between judges, judges vs humans,
and the prompts where judges disagree most."""

from __future__ import annotations

import argparse
import json

from app.commands._ws import workspace_for
from backend.agreement import agreement_report
from storage import agreement as agstore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", type=int, dest="round_id", help="only this round (default: every round)")
    p.add_argument("--top", type=int, default=20, help="prompts with the most disagreement to list (default 20)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(report: dict) -> str:
    if not report["judges"]:
        return "no judgments yet: run `prefloop judge` first"
    parts = [f"judges: {', '.join(report['judges'])}; rounds: {', '.join(map(str, report['rounds']))}"]
    if report["rank"]:
        parts += ["", "rank correlation over candidates both judged",
                  _table(["round", "judge A", "judge B", "metric", "n", "spearman", "kendall"],
                         [[r["round_id"], r["judge_a"], r["judge_b"], r["metric"], r["n"], _f(r["spearman"]),
                           _f(r["kendall"])] for r in report["rank"]])]
    if report["best_worst"]:
        parts += ["", "same best / same worst pick per prompt",
                  _table(["round", "judge A", "judge B", "prompts", "same best", "same worst", "undecided"],
                         [[r["round_id"], r["judge_a"], r["judge_b"], r["prompts"], _pct(r["same_best"]),
                           _pct(r["same_worst"]), r["undecided"]] for r in report["best_worst"]])]
    if report["human"]:
        parts += ["", "judges vs human labels (latest per annotator)",
                  _table(["round", "judge", "labels", "vs judge's pair", "contradicts", "both scored", "disagree"],
                         [[r["round_id"], r["judge"], r["labels"], r["labels_with_pair"],
                           f"{r['contradicts']} ({_pct(r['contradiction_rate'])})", r["labels_scored"],
                           f"{r['disagree']} ({_pct(r['disagree_rate'])})"] for r in report["human"]])]
    if report["disagreement"]:
        parts += ["", "prompts where judges disagree most (mean |overall difference|); review these first",
                  _table(["round", "prompt", "disagreement", "judges", "candidates", "question"],
                         [[r["round_id"], r["prompt_id"], _f(r["disagreement"]), r["judges"], r["candidates"],
                           (r.get("question") or "")[:60]] for r in report["disagreement"]])]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    with workspace_for(args, "prefloop agreement") as ws:
        cur = ws.cursor()
        report = agreement_report(agstore.judged_scores(cur, args.round_id), agstore.latest_labels(cur, args.round_id),
                                  top=args.top)
        questions = agstore.prompt_questions(cur, [r["prompt_id"] for r in report["disagreement"]])
    for r in report["disagreement"]:
        r["question"] = questions.get(r["prompt_id"])
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
