"""`kvrank eval --profile N`: after the evaluation, one more search of each of the first N queries runs under
torch.profiler and a FLOP counter, and its stages and top operators are printed; bad values are refused."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.eval.profile import CallProfile, format_profile, profile_call


def test_eval_profile_prints_stages_and_operators(tiny_beir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_beir), "--retriever", "bm25", "--rerank", "attn",
                                      "--rerank-depth", "3", "--model", str(tiny_checkpoint), "--store",
                                      str(tmp_path / "store"), "--max-queries", "3", "--profile", "2"])
    assert result.exit_code == 0, result.output
    headings = re.findall(r"^## query (\S+), rerank attn, depth 3: \d+ ms under the profiler, ([\d.]+) GFLOPs",
                          result.output, flags=re.M)
    assert len(headings) == 2 and headings[0][0] != headings[1][0]  # the first two evaluated queries
    assert all(float(gf) > 0 for _, gf in headings)  # the reranker's matmuls were counted
    for stage in ("retrieve", "rerank", "kv_lookup", "scoring", "forward"):
        assert re.search(rf"^\| {stage} \| 1 \| [\d.]+ \|$", result.output, flags=re.M), stage
    assert "| operator | calls | self ms | share | GFLOPs | GFLOPS |" in result.output
    assert re.search(r"^\| aten::(bmm|mm|matmul) \| \d+ \| [\d.]+ \| \d+% \| [\d.]+ \| [\d.]+ \|$", result.output,
                     flags=re.M)
    assert "passage KV:" in result.output  # the evaluation report is still printed


def test_eval_profile_refuses_bad_values(tiny_beir: Path) -> None:
    for args, fragment in ((["--profile", "-1"], "--profile must be >= 0"),
                           (["--profile", "1", "--ray", "auto"], "--ray runs them on workers"),
                           (["--profile", "x"], "Invalid value for '--profile'")):
        result = CliRunner().invoke(app, ["eval", "--data", str(tiny_beir), *args])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output


def test_profile_call_counts_flops_and_keeps_the_top_operators(tmp_path: Path) -> None:
    import torch

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    call = profile_call(lambda: (a @ b).exp_().sum(), "matmul", top=2, trace=tmp_path / "t" / "trace.json")
    assert isinstance(call, CallProfile) and call.flops == 2 * 64 ** 3 and len(call.operators) == 2
    assert (tmp_path / "t" / "trace.json").stat().st_size > 0
    text = format_profile(call)
    assert text.startswith("## matmul:") and "0.00 GFLOPs" in text
