"""bench/kernel_tune.py: from a --tune layout sweep to plugins/config.py's launch table. No GPU."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from plugins import config

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "bench" / "results" / "h100-80gb-hbm3-kernels-quick-tune.json"


@pytest.fixture(scope="module")
def tune(bench_script):
    return bench_script("kernel_tune")


def test_the_committed_sweep_gives_the_committed_table(tune):
    """The evidence behind config.TUNED: re-deriving the table from the H100 sweep changes nothing."""
    rows = json.loads(SWEEP.read_text())["results"]
    decisions = tune.best_layouts(rows)
    assert decisions and not any(d["changed"] for d in decisions)
    for d in decisions:
        assert tuple(d["chosen"]) == config.TUNED[(d["op"], d["dtype"])][d["hidden"]]
        assert d["tokens"] == [16384]
    assert tune.tuned_table(decisions) == config.TUNED


def cell(impl: str, us: float, tokens: int = 16384, hidden: int = 4096) -> dict:
    return {"op": "RMSNorm", "dtype": "bfloat16", "tokens": tokens, "hidden": hidden, "impl": impl, "median_us": us}


def test_a_faster_row_loop_layout_replaces_the_entry_and_noise_does_not(tune):
    now = "x".join(map(str, config.TUNED[("RMSNorm", "bfloat16")][4096]))
    rows = [cell("normfuse", 100.0), cell(f"normfuse[{now}]", 100.0), cell("normfuse[256x2x2]", 90.0),
            cell("normfuse[128x4]", 95.0), cell("normfuse", 200.0, tokens=65536),
            cell(f"normfuse[{now}]", 200.0, tokens=65536), cell("normfuse[256x2x2]", 182.0, tokens=65536),
            cell("normfuse", 5.0, tokens=1)]  # decode cells have no sweep and are not scored
    (d,) = tune.best_layouts(rows)
    assert d["best"] == [256, 2, 2] and d["changed"] and d["tokens"] == [16384, 65536]
    assert d["best_time_ratio"] == pytest.approx((0.90 * 0.91) ** 0.5)
    assert "128x4" not in str(d["best"])  # timed at one token count only: not eligible
    rows[2]["median_us"], rows[6]["median_us"] = 99.0, 198.0  # 1% faster: within the margin
    (d,) = tune.best_layouts(rows)
    assert d["best"] == [256, 2, 2] and not d["changed"] and d["chosen"] == list(config.TUNED[("RMSNorm", "bfloat16")][4096])


def test_failed_cells_and_other_impls_are_ignored(tune):
    rows = [cell("normfuse", 100.0), cell("normfuse[256x2x2]", float("nan")), cell("torch_fused", 10.0),
            cell("normfuse[256x4]", 80.0), cell("normfuse[256x4x1]", 70.0)]
    (d,) = tune.best_layouts(rows)
    assert d["best"] == [256, 4]  # "x1" rows per group is the one-row layout itself, the faster cell wins
    assert d["best_time_ratio"] == pytest.approx(0.70)


def test_a_layout_whose_outputs_disagreed_is_never_chosen(tune):
    rows = [cell("normfuse", 100.0), cell("normfuse[256x4]", 80.0),
            {**cell("normfuse[256x2x2]", 50.0), "agrees_with_table": False, "max_abs_diff_vs_table": 4.0}]
    (d,) = tune.best_layouts(rows)
    assert d["best"] == [256, 4] and d["best_time_ratio"] == pytest.approx(0.80)
    rows[2]["agrees_with_table"] = True
    assert tune.best_layouts(rows)[0]["best"] == [256, 2, 2]


def test_apply_rewrites_only_the_table(tune, tmp_path):
    target = tmp_path / "config.py"
    original = (ROOT / "plugins" / "config.py").read_text()
    target.write_text(original)
    table = tune.tuned_table([{"op": "RMSNorm", "dtype": "bfloat16", "hidden": 768, "chosen": [128, 1, 4]},
                              {"op": "LayerNorm", "dtype": "float16", "hidden": 3072, "chosen": [256, 2]}])
    tune.apply(table, target)
    text = target.read_text()
    assert text.replace(tune.table_source(table), "") == original.replace(tune.table_source(config.TUNED), "")
    assignment = next(n for n in ast.parse(text).body if isinstance(n, ast.AnnAssign) and n.target.id == "TUNED")
    parsed = ast.literal_eval(assignment.value)
    assert parsed[("RMSNorm", "bfloat16")][768] == (128, 1, 4) and parsed[("LayerNorm", "float16")][3072] == (256, 2)
    assert parsed[("AddRMSNorm", "float32")] == config.TUNED[("AddRMSNorm", "float32")]
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_the_committed_table_is_what_the_writer_writes(tune):
    """table_source reproduces config.py's TUNED block byte for byte, so --apply diffs stay small."""
    assert tune.table_source(config.TUNED) in (ROOT / "plugins" / "config.py").read_text()


def test_a_file_that_is_no_sweep_is_a_one_line_error(tune, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        tune.main([str(bad)])
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"results": [cell("normfuse", 1.0)]}))
    with pytest.raises(SystemExit, match="--tune"):
        tune.main([str(plain)])
