"""bench/kernel_targets.py: the kernels' targets judged from bench/kernels.py results. No GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "h100-80gb-hbm3-kernels-quick-tune.json"


@pytest.fixture(scope="module")
def targets(bench_script):
    return bench_script("kernel_targets")


def run_file(rows: list[dict], copy: float = 3.0, empty: float = 4.0, warm: float | None = 3.8) -> dict:
    data = {"copy": {"tbps": copy}, "empty_launch": {"median_us": empty}, "results": rows}
    if warm is not None:
        data["empty_launch_l2_warm"] = {"median_us": warm}
    return data


def cell(op, impl, tokens=16384, hidden=4096, tbps=None, us=None, **extra) -> dict:
    return {"op": op, "dtype": "bfloat16", "tokens": tokens, "hidden": hidden, "impl": impl,
            "tbps": tbps if tbps is not None else 0.01, "median_us": us if us is not None else 100.0, **extra}


def test_bandwidth_needs_the_copy_fraction_and_for_rms_norm_the_speed_up(targets):
    rows = [cell("RMSNorm", "normfuse", tbps=2.75, us=100.0, same_size_copy_tbps=2.9),  # 92%, 1.20x
            cell("RMSNorm", "torch_fused", tbps=2.3, us=120.0),
            cell("AddRMSNorm", "normfuse", tbps=2.75, us=100.0), cell("AddRMSNorm", "torch_fused", us=105.0),  # 1.05x
            cell("LayerNorm", "normfuse", tbps=2.58, us=100.0),  # 86%, no speed-up target
            cell("AddLayerNorm", "normfuse", tbps=2.5, us=100.0),  # 83%
            cell("RMSNorm", "normfuse", tokens=2048, tbps=1.0)]  # not a target cell
    verdicts = {v["op"]: v for v in targets.judge(run_file(rows))}
    assert set(verdicts) == {"RMSNorm", "AddRMSNorm", "LayerNorm", "AddLayerNorm"}
    assert verdicts["RMSNorm"]["met"] and verdicts["RMSNorm"]["speedup_vs_torch"] == pytest.approx(1.2)
    assert verdicts["RMSNorm"]["same_size_copy_fraction"] == pytest.approx(2.75 / 2.9)
    assert not verdicts["AddRMSNorm"]["met"]  # 92% of copy, but only 1.05x torch
    assert verdicts["LayerNorm"]["met"] and not verdicts["AddLayerNorm"]["met"]
    rows[1]["median_us"] = 80.0
    again = {v["op"]: v for v in targets.judge(run_file(rows))}
    assert not again["RMSNorm"]["met"]  # now 0.8x torch: missed


def test_decode_is_judged_flushed_and_warm_against_the_empty_launch_of_the_same_run(targets):
    rows = [cell("RMSNorm", "normfuse", tokens=1, us=5.9), cell("RMSNorm", "normfuse_l2_warm", tokens=1, us=5.9),
            cell("RMSNorm", "normfuse", tokens=32, hidden=8192, us=6.5),
            cell("RMSNorm", "split[128x2x8]", tokens=32, hidden=8192, us=5.5, agrees_with_table=True),
            cell("RMSNorm", "tactic2", tokens=32, hidden=8192, us=4.1, agrees_with_table=False)]
    one, two = targets.judge(run_file(rows))
    assert one["over_empty_us"] == pytest.approx(1.9) and one["over_empty_warm_us"] == pytest.approx(2.1)
    assert not one["met"]  # within 2 us after a flush, not with L2 warm
    assert not two["met"] and two["over_empty_warm_us"] is None
    assert two["best_alternative"]["impl"] == "split[128x2x8]" and two["best_alternative"]["met"]  # tactic2 was wrong
    assert targets.judge(run_file(rows, warm=None))[0]["met"]  # a run without the warm launch: flushed only


def test_the_committed_h100_sweep(targets):
    """The last H100 sweep, as the README quotes it: RMSNorm at 16384x4096 misses 90% of copy,
    AddRMSNorm at 16384x8192 meets it, and LayerNorm at 16384x8192 misses 85%."""
    verdicts = {(v["op"], v["hidden"]): v for v in targets.judge(json.loads(COMMITTED.read_text()), "h100")}
    assert len(verdicts) == 8
    assert not verdicts[("RMSNorm", 4096)]["met"] and verdicts[("RMSNorm", 4096)]["copy_fraction"] == pytest.approx(0.84, abs=0.01)
    assert verdicts[("AddRMSNorm", 8192)]["met"]
    assert not verdicts[("LayerNorm", 8192)]["met"]


def test_todays_table_is_judged_from_the_runs_timing_of_its_kernel(targets):
    """A run made before the launch table changed: the cell is judged again with the kernel the
    table picks now, from the same run's timing of that kernel (an agreeing sweep layout), and
    said to be untimed where the run did not time it."""
    from plugins import config

    now = config.launch_config("RMSNorm", "bfloat16", 16384, 4096).kernel
    old = "normfuse_rms_norm_t1024_r1_c1"
    untimed = "normfuse_layer_norm_t1024_r1_c1"
    assert now != old and config.launch_config("LayerNorm", "bfloat16", 16384, 4096).kernel != untimed
    rows = [cell("RMSNorm", "normfuse", tbps=2.4, us=110.0, kernel=old),  # 80%: missed
            cell("RMSNorm", "torch_fused", us=130.0),
            cell("RMSNorm", "normfuse[fast]", tbps=2.8, us=94.0, kernel=now, agrees_with_table=True),  # 93%, 1.38x
            cell("LayerNorm", "normfuse", tbps=2.4, us=110.0, kernel=untimed)]
    verdicts = {v["op"]: v for v in targets.judge(run_file(rows))}
    rms, ln = verdicts["RMSNorm"], verdicts["LayerNorm"]
    assert not rms["met"] and rms["table_now"]["kernel"] == now and not rms["table_now"]["same"]
    assert rms["table_now"]["met"] and rms["table_now"]["copy_fraction"] == pytest.approx(2.8 / 3.0)
    assert "met" not in ln["table_now"]  # today's LayerNorm kernel was not timed in this run
    table = targets.report(list(verdicts.values()))
    assert "by today's launch table, 1 (its kernel changed since the run in 2 cells, 1 of them not timed" in table
    assert f"{now.split('rms_norm_')[1]}: 93% (met) |" in table and ": not timed |" in table

    rows[2]["agrees_with_table"] = False  # a layout that computed something else proves nothing
    assert "met" not in targets.judge(run_file(rows))[1]["table_now"]
    rows[0]["kernel"] = now  # the run ran today's kernel: the same verdict, said as "same"
    again = {v["op"]: v for v in targets.judge(run_file(rows))}["RMSNorm"]
    assert again["table_now"]["same"] and targets.today(again) == "same"
    del rows[0]["kernel"]  # an older file, which names no kernels: nothing to match
    assert {v["op"]: v for v in targets.judge(run_file(rows))}["RMSNorm"]["table_now"] is None


def test_decode_under_todays_table_is_judged_after_the_flush(targets):
    from plugins import config

    now = config.launch_config("RMSNorm", "bfloat16", 1, 8192).kernel
    rows = [cell("RMSNorm", "normfuse", tokens=1, hidden=8192, us=7.0, kernel="normfuse_rms_norm_t32_r8_c4"),
            cell("RMSNorm", "tactic1", tokens=1, hidden=8192, us=5.5, kernel=now, agrees_with_table=True)]
    (v,) = targets.judge(run_file(rows))
    assert not v["met"] and v["table_now"]["met"] and v["table_now"]["over_empty_us"] == pytest.approx(1.5)


def test_the_command_writes_its_tables_and_check_fails_on_a_miss(targets, tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(run_file([cell("LayerNorm", "normfuse", tbps=2.9)])))
    assert targets.main([str(good), "--out", str(tmp_path / "out"), "--check"]) == 0
    assert "bandwidth: 1 of 1 cells met" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "kernel-targets.json").read_text())["verdicts"][0]["met"]
    assert "| good | LayerNorm |" in (tmp_path / "out" / "kernel-targets.md").read_text()
    assert targets.main([str(COMMITTED), "--check"]) == 1
    assert targets.main([str(COMMITTED)]) == 0
    ab = tmp_path / "ab" / "partial.json"  # an A/B run stopped early: skipped, the others judged
    ab.parent.mkdir()
    ab.write_text(json.dumps({**run_file([]), "variants": [{"label": "worktree"}]}))
    stopped = tmp_path / "bw" / "partial.json"
    stopped.parent.mkdir()
    stopped.write_text(json.dumps(run_file([cell("LayerNorm", "normfuse", tbps=2.0)])))
    assert targets.main([str(ab), str(stopped), "--check"]) == 1
    captured = capsys.readouterr()
    assert "ab/partial.json: skipped, an A/B run" in captured.err and "| bw/partial | LayerNorm |" in captured.out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"bad.json: not a bench/kernels.py results file \(KeyError"):
        targets.main([str(bad)])
