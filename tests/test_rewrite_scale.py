"""The scale benchmark's targets, as a test: a 32-layer LLaMA-7B-shaped graph with 13 GB of
external fp16 weights (a sparse file) is rewritten in <= 5 s and <= 300 MB peak RSS."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_llama_7b_shaped_graph_meets_the_targets(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    from rewrite_scale import main

    assert main(["--layers", "32", "--hidden", "4096", "--ffn", "11008"]) == 0, capsys.readouterr().out
