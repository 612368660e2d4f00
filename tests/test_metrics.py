"""Metrics against inline TREC-format fixtures with hand-computed values (gain = relevance, log2(rank+1))."""

from __future__ import annotations

import math

import pytest

from kvrank.errors import KvrankError
from kvrank.eval.latency import StageTimer
from kvrank.eval.metrics import evaluate, measures_for, parse_metrics, per_query, primary_metric
from kvrank.types import Qrel, ScoredDoc

BINARY_QRELS = """\
q1 0 d1 1
q1 0 d2 0
q1 0 d3 1
q2 0 d4 1
q3 0 d9 1
"""
# q2 finds its one relevant doc at rank 11: outside nDCG@10 and RR@10, inside R@100. q3 is not in the run.
BINARY_RUN = (
    """\
q1 Q0 d2 1 3.0 t
q1 Q0 d1 2 2.0 t
q1 Q0 d5 3 1.0 t
q1 Q0 d3 4 0.5 t
"""
    + "".join(f"q2 Q0 x{i} {i} {20 - i}.0 t\n" for i in range(1, 11))
    + "q2 Q0 d4 11 5.0 t\n"
)

GRADED_QRELS = """\
g1 0 dA 3
g1 0 dB 2
g1 0 dC 1
g1 0 dD 0
g1 0 dE 2
g1 0 dF 1
"""
GRADED_RUN = """\
g1 Q0 dC 1 4.0 t
g1 Q0 dA 2 3.0 t
g1 Q0 dD 3 2.0 t
g1 Q0 dB 4 1.0 t
"""


def parse_qrels(text: str) -> list[Qrel]:
    return [Qrel(q, d, int(r)) for q, _, d, r in (line.split() for line in text.splitlines())]


def parse_run(text: str) -> dict[str, list[ScoredDoc]]:
    run: dict[str, list[ScoredDoc]] = {}
    for q, _, d, _, s, _ in (line.split() for line in text.splitlines()):
        run.setdefault(q, []).append(ScoredDoc(q, d, float(s)))
    return run


def test_binary_hand_computed() -> None:
    values = evaluate(parse_run(BINARY_RUN), parse_qrels(BINARY_QRELS))
    # q1: relevant at ranks 2 and 4. DCG = 1/log2(3) + 1/log2(5) = 0.630930 + 0.430677 = 1.061606;
    #     IDCG = 1 + 1/log2(3) = 1.630930; nDCG = 0.650921. RR = 1/2. R@100 = 2/2.
    # q2: rank 11 -> nDCG@10 = 0, RR@10 = 0, R@100 = 1. q3: absent from the run -> 0 everywhere.
    assert values["nDCG@10"] == pytest.approx(0.650921 / 3, abs=1e-6)
    assert values["RR@10"] == pytest.approx(0.5 / 3, abs=1e-9)
    assert values["R@100"] == pytest.approx(2 / 3, abs=1e-9)
    assert set(values) == {"nDCG@10", "RR@10", "R@100"} and primary_metric == "nDCG@10"


def test_binary_per_query() -> None:
    values = per_query(parse_run(BINARY_RUN), parse_qrels(BINARY_QRELS))
    assert values["q1"]["nDCG@10"] == pytest.approx(0.650921, abs=1e-6)
    assert values["q2"] == pytest.approx({"nDCG@10": 0.0, "RR@10": 0.0, "R@100": 1.0})


def test_graded_relevance_two_counts_for_rr_and_recall() -> None:
    """A 0-3 scale at TREC DL's level 2."""
    values = evaluate(parse_run(GRADED_RUN), parse_qrels(GRADED_QRELS), rel_level=2)
    # Graded gains: DCG = 1/log2(2) + 3/log2(3) + 0 + 2/log2(5) = 1 + 1.892789 + 0.861353 = 3.754142
    # Ideal order 3,2,2,1,1: IDCG = 3 + 2/log2(3) + 2/log2(4) + 1/log2(5) + 1/log2(6)
    #                             = 3 + 1.261860 + 1 + 0.430677 + 0.386853 = 6.079390; nDCG = 0.617519
    assert values["nDCG@10"] == pytest.approx(0.617519, abs=1e-6)
    # Relevant means >= 2: first such doc (dA) is at rank 2 -> RR = 0.5 (with rel >= 1 it would be 1.0).
    assert values["RR@10"] == pytest.approx(0.5)
    # Relevant (>= 2) are dA, dB, dE; dA and dB retrieved -> 2/3 (with rel >= 1 it would be 3/5).
    assert values["R@100"] == pytest.approx(2 / 3)


def test_hand_values_match_formula() -> None:
    # The literals above, recomputed from the definition, so a typo in a comment cannot hide.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert dcg / (1 + 1 / math.log2(3)) == pytest.approx(0.650921, abs=1e-6)
    graded = 1 + 3 / math.log2(3) + 2 / math.log2(5)
    ideal = 3 + 2 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(6)
    assert graded / ideal == pytest.approx(0.617519, abs=1e-6)


def test_graded_0_3_at_level_1_and_3() -> None:
    """The same 0-3 run at level 1 (any positive grade) and level 3 (only dA); nDCG does not change."""
    run, qrels = parse_run(GRADED_RUN), parse_qrels(GRADED_QRELS)
    one = evaluate(run, qrels, rel_level=1)
    # >= 1: dA, dB, dC, dE, dF relevant; dC at rank 1 -> RR 1; retrieved dC, dA, dB -> R 3/5.
    assert one["RR@10"] == pytest.approx(1.0) and one["R@100"] == pytest.approx(3 / 5)
    three = evaluate(run, qrels, rel_level=3)
    # >= 3: only dA, at rank 2 -> RR 1/2, R 1/1.
    assert three["RR@10"] == pytest.approx(0.5) and three["R@100"] == pytest.approx(1.0)
    assert one["nDCG@10"] == three["nDCG@10"] == pytest.approx(0.617519, abs=1e-6)


# A BEIR-style 0-2 scale (NFCorpus, TREC-COVID): 2 highly relevant, 1 partially relevant.
SCALE_0_2_QRELS = """\
n1 0 a 2
n1 0 b 1
n1 0 c 1
n1 0 z 0
n2 0 e 1
n2 0 f 2
"""
SCALE_0_2_RUN = """\
n1 Q0 b 1 5.0 t
n1 Q0 z 2 4.0 t
n1 Q0 x 3 3.0 t
n1 Q0 a 4 2.0 t
n2 Q0 e 1 3.0 t
n2 Q0 y 2 2.0 t
"""


def test_graded_0_2_beir_level_1_and_level_2() -> None:
    run, qrels = parse_run(SCALE_0_2_RUN), parse_qrels(SCALE_0_2_QRELS)
    beir = evaluate(run, qrels, ("RR@10", "R@100", "P@2", "AP@1000"), rel_level=1)
    # n1 (relevant b, c, a): b at 1 -> RR 1; found b, a -> R 2/3; P@2 = 1/2; AP = (1/1 + 2/4) / 3 = 0.5.
    # n2 (relevant e, f): e at 1 -> RR 1; R 1/2; P@2 = 1/2; AP = (1/1) / 2 = 0.5.
    assert beir["RR@10"] == pytest.approx(1.0)
    assert beir["R@100"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert beir["P@2"] == pytest.approx(0.5)
    assert beir["AP@1000"] == pytest.approx(0.5)
    strict = evaluate(run, qrels, ("RR@10", "R@100", "P@2", "AP@1000"), rel_level=2)
    # n1 (relevant a only): a at 4 -> RR 1/4, R 1, P@2 0, AP 1/4. n2 (relevant f only, never retrieved): all 0.
    assert strict["RR@10"] == pytest.approx(0.25 / 2)
    assert strict["R@100"] == pytest.approx(0.5)
    assert strict["P@2"] == pytest.approx(0.0)
    assert strict["AP@1000"] == pytest.approx(0.25 / 2)


def test_level_goes_only_to_binary_measures_and_an_explicit_rel_wins() -> None:
    measures = measures_for(("nDCG@10", "RR@10", "R(rel=3)@100", "AP@1000"), rel_level=2)
    assert str(measures["nDCG@10"]) == "nDCG@10"
    assert str(measures["RR@10"]) == "RR(rel=2)@10" and str(measures["AP@1000"]) == "AP(rel=2)@1000"
    assert str(measures["R(rel=3)@100"]) == "R(rel=3)@100"
    with pytest.raises(KvrankError, match=r"^rel_level must be >= 1 .*, got 0") as error:
        measures_for(rel_level=0)
    assert error.value.param == "rel_level"


def test_per_query_keeps_both_names_of_one_measure() -> None:
    values = per_query(parse_run(GRADED_RUN), parse_qrels(GRADED_QRELS), ("R@100", "R(rel=2)@100"), rel_level=2)
    assert values["g1"] == pytest.approx({"R@100": 2 / 3, "R(rel=2)@100": 2 / 3})


def test_parse_metrics_accepts_ir_measures_and_trec_eval_names() -> None:
    assert parse_metrics("AP@1000 R@1000 P@10 nDCG@20") == ("AP@1000", "R@1000", "P@10", "nDCG@20")
    assert parse_metrics(["map,ndcg_cut.10", "P(rel=2,judged_only=True)@10", "map"]) == (
        "AP", "nDCG@10", "P(rel=2,judged_only=True)@10")
    for bad in ("bogus@10", "nDCG@x", "P(rel=2@10"):
        with pytest.raises(KvrankError, match=f"^metrics: {bad!r} is not an ir_measures measure".replace("(", r"\(")) \
                as error:
            parse_metrics(f"nDCG@10 {bad}")
        assert error.value.param == "metrics"
    with pytest.raises(KvrankError, match=r"'nDCG\(foo=1\)@10' has a bad parameter \(unsupported params found"):
        parse_metrics("nDCG(foo=1)@10")
    with pytest.raises(KvrankError, match="invalid param cutoff=1.5"):
        parse_metrics("nDCG@1.5")
    with pytest.raises(KvrankError, match="^metrics is empty"):
        parse_metrics(" , ")


def test_latency_excludes_warmup() -> None:
    timer = StageTimer(warmup=1)
    for ms in [1000.0, 1.0, 2.0, 3.0, 4.0, 5.0]:
        timer.add("retrieve", ms)
    stats = timer.summary()["retrieve"]
    assert stats["n"] == 5
    assert stats["p50"] == pytest.approx(3.0)
    assert stats["p95"] == pytest.approx(4.8)  # numpy linear interpolation over [1, 2, 3, 4, 5]


def test_latency_keeps_samples_when_only_warmup() -> None:
    timer = StageTimer(warmup=1)
    timer.add("retrieve", 7.0)
    assert timer.summary()["retrieve"]["p50"] == pytest.approx(7.0)
    with timer.stage("scoring"):
        pass
    assert timer.summary()["scoring"]["n"] == 1
