"""The scale benchmark's targets, as a test: a 32-layer LLaMA-7B-shaped graph with 13 GB of
external fp16 weights (a sparse file) is rewritten in <= 5 s and <= 300 MB peak RSS."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_llama_7b_shaped_graph_meets_the_targets(capsys, bench_script):
    main = bench_script("rewrite_scale").main
    assert main(["--layers", "32", "--hidden", "4096", "--ffn", "11008"]) == 0, capsys.readouterr().out
