"""Significance tests on fixed per-query vectors with p-values computed by hand (exact sign-flip enumeration),
Holm-Bonferroni on a worked example, and the pairwise comparison of reports."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvrank.errors import KvrankError
from kvrank.eval.compare import compare_reports
from kvrank.eval.runner import EvalReport
from kvrank.eval.significance import N_RESAMPLES, holm, mark, paired_p_value, paired_tests


def test_exact_small_case_by_hand() -> None:
    # Differences 1, 2, 3: of the 8 sign patterns, the sums are +-6, +-4, +-2, 0, 0; |sum| >= 6 twice -> p = 2/8.
    assert paired_p_value([0, 0, 0], [1, 2, 3]) == pytest.approx(0.25)
    # Ten equal gains: only all-plus and all-minus reach |mean| = 1 -> p = 2 / 2**10.
    assert paired_p_value([0.2] * 10, [0.7] * 10) == pytest.approx(2 / 1024)
    # A zero difference flips to itself: differences 0.5, 0 -> every pattern has |mean| 0.25 -> p = 1.
    assert paired_p_value([0.5, 0.3], [1.0, 0.3]) == pytest.approx(1.0)
    assert paired_p_value([0.1, 0.2], [0.1, 0.2]) == 1.0  # identical runs


def test_exact_matches_brute_force_enumeration() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.random(9), rng.random(9)  # 2**9 = 512 <= N_RESAMPLES: scipy enumerates every pattern
    diff = b - a
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=9)))
    brute = np.mean(np.abs((signs * diff).mean(axis=1)) >= abs(diff.mean()) - 1e-12)
    assert paired_p_value(a, b) == pytest.approx(brute)
    assert paired_p_value(a, b) == paired_p_value(b, a)  # two-sided: symmetric


def test_randomized_above_13_queries_is_seeded_and_close_to_the_t_test() -> None:
    from scipy import stats

    rng = np.random.default_rng(3)
    a = rng.random(300)
    b = a + rng.normal(0.02, 0.1, 300)
    p = paired_p_value(a, b)
    assert p == paired_p_value(a, b)  # fixed seed: the same p every time
    assert (p * (N_RESAMPLES + 1)) == pytest.approx(round(p * (N_RESAMPLES + 1)))  # (hits + 1) / (R + 1)
    assert abs(p - stats.ttest_rel(b, a).pvalue) < 0.01  # n = 300: the two tests agree closely
    assert p < 0.05 and mark(p) == "\u2020" and mark(0.05) == "" and mark(None) == ""


def test_paired_tests_use_shared_queries_only() -> None:
    first = {"q1": {"m": 0.0}, "q2": {"m": 0.0}, "q3": {"m": 0.0}, "only-a": {"m": 0.9}}
    second = {"q1": {"m": 1.0}, "q2": {"m": 2.0}, "q3": {"m": 3.0}, "only-b": {"m": 0.0}}
    assert paired_tests(first, second, ["m"]) == {"m": pytest.approx(0.25)}
    with pytest.raises(KvrankError, match="share no queries"):
        paired_tests({"x": {"m": 1.0}}, {"y": {"m": 1.0}}, ["m"])


def test_holm_worked_example() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max -> 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])


def report(dataset: str, values: dict[str, float], rel_level: int = 1, metric: str = "nDCG@10") -> EvalReport:
    per_query = {qid: {"text": qid, "warmup": False, "first_stage": {metric: 0.0}, "final": {metric: v},
                       "latency_ms": {}} for qid, v in values.items()}
    mean = sum(values.values()) / len(values)
    return EvalReport(dataset=dataset, retriever="bm25", queries=len(values), first_stage_run={}, run={},
                      metrics={metric: mean}, first_stage_metrics={metric: 0.0}, latency_ms={},
                      settings={"rel_level": rel_level}, per_query=per_query)


def test_compare_reports_pairwise_with_holm() -> None:
    a = report("set", {"q1": 0.0, "q2": 0.0, "q3": 0.0})
    b = report("set", {"q1": 1.0, "q2": 2.0, "q3": 3.0, "q4": 9.0})  # q4 is not in a: left out
    c = report("set", {"q1": 0.0, "q2": 0.0, "q3": 0.0})
    rows = compare_reports([("a", a), ("b", b), ("c", c)])
    assert [(r.a, r.b) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab, ac, bc = rows
    assert ab.queries == 3 and ab.mean_a == 0.0 and ab.mean_b == pytest.approx(2.0)
    assert (ab.p_value, ac.p_value, bc.p_value) == pytest.approx((0.25, 1.0, 0.25))
    # Holm over the three pairs: sorted 0.25, 0.25, 1.0 times 3, 2, 1 = 0.75, 0.5 -> running max 0.75, 0.75, 1.
    assert (ab.p_holm, ac.p_holm, bc.p_holm) == pytest.approx((0.75, 1.0, 0.75))


def test_compare_reports_refuses_what_cannot_be_compared() -> None:
    a = report("scifact", {"q1": 0.5})
    with pytest.raises(KvrankError, match="at least two reports"):
        compare_reports([("a", a)])
    with pytest.raises(KvrankError, match="dataset 'nfcorpus' but a is for 'scifact'"):
        compare_reports([("a", a), ("b", report("nfcorpus", {"q1": 0.5}))])
    with pytest.raises(KvrankError, match="counts relevance >= 2 but a counts >= 1"):
        compare_reports([("a", a), ("b", report("scifact", {"q1": 0.5}, rel_level=2))])
    empty = report("scifact", {"q1": 0.5})
    empty.per_query = {}
    with pytest.raises(KvrankError, match="b has no per-query values"):
        compare_reports([("a", a), ("b", empty)])
    with pytest.raises(KvrankError, match="no metric in common"):
        compare_reports([("a", a), ("b", report("scifact", {"q1": 0.5}, metric="AP@1000"))])
    with pytest.raises(KvrankError, match="share no queries"):
        compare_reports([("a", a), ("b", report("scifact", {"q9": 0.5}))])


def test_report_round_trip_and_table_show_p_values(tmp_path) -> None:
    from rich.console import Console

    from kvrank.eval.report import report_tables
    from kvrank.eval.runner import load_report

    rep = report("trec-dl-2019", {"q1": 0.5}, rel_level=2)
    rep.metrics, rep.first_stage_metrics = {"nDCG@10": 0.60, "AP@1000": 0.30}, {"nDCG@10": 0.50, "AP@1000": 0.30}
    rep.settings |= {"rerank": True, "rerank_mode": "ql", "rerank_depth": 20, "k": 100,
                     "rel_level_basis": "TREC DL passage convention"}
    rep.significance = {"test": "paired randomization test", "p_values": {"nDCG@10": 0.0123, "AP@1000": 0.5}}
    rep.write_json(tmp_path / "r.json")
    back = load_report(tmp_path / "r.json")
    assert back.significance == rep.significance and "significance" not in back.extra
    console = Console(record=True, width=200)
    for renderable in report_tables(back):
        console.print(renderable)
    text = console.export_text()
    assert "0.6000 (+0.1000)\u2020" in text and "0.3000 (+0.0000) " in text  # dagger only below 0.05
    assert "0.0123" in text and "0.5000" in text
    assert "count relevance >= 2: TREC DL passage convention" in text
    assert "AP@1000: computed over the run's depth (at most k=100" in text
