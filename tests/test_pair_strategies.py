"""Pair strategies on hand-made scores: margins, ties, thresholds, human overrides, majority."""

from __future__ import annotations

import pytest

from backend.pairs import STRATEGIES, Candidate, Label, PairOptions, PromptItem, build_pairs


def cand(cid, judge="gemini", overall=None, h=None, c=None, coh=None, origin="policy", view="original", text=None, idx=0):
    scores = {}
    if any(v is not None for v in (overall, h, c, coh)):
        scores[judge] = {"overall": overall, "helpfulness": h, "correctness": c, "coherence": coh,
                         "complexity": None, "verbosity": None}
    return Candidate(cid, text or f"answer {cid}", origin, view, idx, scores)


def test_best_worst_picks_extremes_with_margin():
    item = PromptItem("p1", (cand("a", overall=0.2), cand("b", overall=0.9), cand("c", overall=0.5)))
    res = build_pairs([item], "best-worst", PairOptions(judge="gemini"))
    [p] = res.pairs
    assert (p.chosen_id, p.rejected_id, p.source) == ("b", "a", "gemini")
    assert p.margin == pytest.approx(0.7)
    assert p.chosen_scores["gemini"]["overall"] == 0.9 and p.rejected_scores["gemini"]["overall"] == 0.2


def test_best_worst_tie_and_single_candidate_are_counted_not_crashing():
    tie = PromptItem("t", (cand("a", overall=0.5), cand("b", overall=0.5)))
    single = PromptItem("s", (cand("a", overall=0.5),))
    unscored = PromptItem("u", (cand("a"), cand("b", overall=0.3)))
    res = build_pairs([tie, single, unscored], "best-worst", PairOptions(judge="gemini"))
    assert res.pairs == []
    assert res.skipped == {"tie": 1, "fewer_than_two_scored": 2}


def test_best_worst_needs_a_judge():
    with pytest.raises(ValueError, match="needs a judge"):
        build_pairs([PromptItem("p", (cand("a", overall=1.0), cand("b", overall=0.0)))], "best-worst")


def test_best_vs_random_margin_inclusive_at_threshold():
    # best HCC = 12; b = 10 (exactly 2 lower: eligible), c = 11 (1 lower: not eligible)
    item = PromptItem("p", (cand("a", h=4, c=4, coh=4), cand("b", h=3, c=3, coh=4), cand("c", h=4, c=3, coh=4)))
    res = build_pairs([item], "best-vs-random", PairOptions(judge="gemini", min_margin=2))
    [p] = res.pairs
    assert (p.chosen_id, p.rejected_id, p.margin) == ("a", "b", 2.0)
    assert p.rubric_delta == {"helpfulness": 1, "correctness": 1, "coherence": 0}
    res3 = build_pairs([item], "best-vs-random", PairOptions(judge="gemini", min_margin=2.5))
    assert res3.pairs == [] and res3.skipped == {"below_margin": 1}


def test_best_vs_random_is_seeded_and_covers_eligible():
    cands = (cand("top", h=4, c=4, coh=4),) + tuple(cand(f"x{i}", h=1, c=1, coh=1) for i in range(6))
    item = PromptItem("p", cands)
    picks = {build_pairs([item], "best-vs-random", PairOptions(judge="gemini", seed=s)).pairs[0].rejected_id
             for s in range(40)}
    assert len(picks) > 1, "the rejected one is random over the eligible candidates"
    a = build_pairs([item], "best-vs-random", PairOptions(judge="gemini", seed=7)).pairs
    b = build_pairs([item], "best-vs-random", PairOptions(judge="gemini", seed=7)).pairs
    assert a == b


def test_seva_original_chosen_equal_answers_dropped():
    item = PromptItem("p", (
        cand("o0", text="A red ball.", idx=0), cand("o1", text="Something else", idx=1),
        cand("f", origin="seva_augmented", view="aug:flip", text="  a RED   ball. "),
        cand("d", origin="seva_augmented", view="aug:diffusion:500", text="A blue ball."),
    ))
    res = build_pairs([item], "seva")
    assert [(p.chosen_id, p.rejected_id, p.source) for p in res.pairs] == [("o0", "d", "seva")]
    only_equal = PromptItem("q", (cand("o0", text="x"), cand("f", origin="seva_augmented", view="aug:flip", text="X")))
    no_aug = PromptItem("r", (cand("o0", text="x"),))
    res2 = build_pairs([only_equal, no_aug], "seva")
    assert res2.pairs == [] and res2.skipped == {"equal_answers": 1, "no_augmented_view": 1}


def test_human_label_overrides_ai_and_ranking_expands():
    cands = (cand("a", overall=0.9), cand("b", overall=0.1), cand("c", overall=0.5))
    human = PromptItem("p", cands, (Label("ann1", chosen_id="b", rejected_id="a"),))
    ranked = PromptItem("q", cands, (Label("ann1", ranking=("c", "a", "b")),))
    res = build_pairs([human, ranked], "best-worst", PairOptions(judge="gemini"))
    got = [(p.prompt_id, p.chosen_id, p.rejected_id, p.source) for p in res.pairs]
    assert got == [("p", "b", "a", "human"), ("q", "c", "a", "human"), ("q", "c", "b", "human"),
                   ("q", "a", "b", "human")]


def test_all_bad_drops_prompt_and_skip_label_does_not_vote():
    cands = (cand("a", overall=0.9), cand("b", overall=0.1))
    bad = PromptItem("p", cands, (Label("ann1", all_bad=True),))
    skipped = PromptItem("q", cands, (Label("ann1", skipped=True),))
    res = build_pairs([bad, skipped], "best-worst", PairOptions(judge="gemini"))
    assert [(p.prompt_id, p.source) for p in res.pairs] == [("q", "gemini")]
    assert res.skipped == {"all_bad": 1}


def test_annotator_majority_and_tie_listed_for_admin():
    cands = (cand("a", overall=0.9), cand("b", overall=0.1))
    majority = PromptItem("p", cands, (Label("x", chosen_id="b", rejected_id="a"),
                                       Label("y", chosen_id="b", rejected_id="a"),
                                       Label("z", chosen_id="a", rejected_id="b")))
    tie = PromptItem("t", cands, (Label("x", chosen_id="b", rejected_id="a"), Label("y", all_bad=True)))
    res = build_pairs([majority, tie], "best-worst", PairOptions(judge="gemini"))
    assert [(p.prompt_id, p.chosen_id) for p in res.pairs] == [("p", "b")]
    assert res.needs_admin == ["t"] and res.skipped == {"annotator_tie": 1}


def test_imported_preference_beats_ai_but_not_human():
    cands = (cand("a", overall=0.9), cand("b", overall=0.1))
    imp = PromptItem("p", cands, (Label("import", source="imported", chosen_id="b", rejected_id="a"),))
    both = PromptItem("q", cands, (Label("import", source="imported", chosen_id="b", rejected_id="a"),
                                   Label("ann", chosen_id="a", rejected_id="b")))
    res = build_pairs([imp, both], "human-only")
    assert [(p.prompt_id, p.chosen_id, p.source) for p in res.pairs] == [("p", "b", "imported"), ("q", "a", "human")]


def test_human_only_skips_unlabelled_and_unknown_strategy_errors():
    res = build_pairs([PromptItem("p", (cand("a"), cand("b")))], "human-only")
    assert res.pairs == [] and res.skipped == {"no_label": 1}
    with pytest.raises(ValueError, match="unknown pair strategy"):
        build_pairs([], "nope")
    assert set(STRATEGIES) == {"best-worst", "best-vs-random", "seva", "human-only"}
