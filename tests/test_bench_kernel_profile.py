"""bench/kernel_profile.py without a GPU: its cells, the ncu commands it runs, and how it reads
ncu's raw CSV page (here a small export in that page's layout: header, units row, one row per
kernel, ==PROF== lines around) into the per-kernel summary."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


@pytest.fixture(scope="module")
def profile(bench_script):
    return bench_script("kernel_profile")


def test_cells_name_an_op_a_shape_and_optionally_a_layout(profile):
    assert profile.parse_cell("RMSNorm:16384x768") == {"op": "RMSNorm", "tokens": 16384, "hidden": 768, "layout": None}
    assert profile.parse_cell("AddLayerNorm:1x8192@128x1x4")["layout"] == (128, 1, 4)
    for bad in ("RMSNorm:16384", "GroupNorm:1x8", "RMSNorm:1x8@128", "RMSNorm:1x8@a"):
        with pytest.raises(profile.ProfileError, match="OP:TOKENSxHIDDEN"):
            profile.parse_cell(bad)


def test_it_profiles_only_its_own_window_and_exports_base_units(profile, tmp_path):
    run, export = profile.ncu_commands("ncu", tmp_path / "r.ncu-rep", ["RMSNorm:1x8", "--out", "x"])
    assert run[:3] == ["ncu", "--profile-from-start", "off"]
    assert run[run.index("--clock-control") + 1] == "none"  # the setting seen working on the lent machines
    assert run[-6:] == [sys.executable, str(Path(profile.__file__).resolve()), "--inside-ncu", "RMSNorm:1x8", "--out", "x"]
    assert run[run.index("--export") + 1] == str(tmp_path / "r.ncu-rep")
    metrics = run[run.index("--metrics") + 1].split(",")
    assert STALL.format("long_scoreboard") in metrics and len(metrics) == len(profile.STALL_REASONS)
    assert [run[i + 1] for i, a in enumerate(run) if a == "--section"] == list(profile.SECTIONS)
    assert export == ["ncu", "--import", str(tmp_path / "r.ncu-rep"), "--page", "raw", "--csv", "--print-units", "base"]


def raw_page(kernels: list[tuple[str, dict[str, str]]]) -> str:
    """A raw-page export: ncu's banner lines, the header, the units row, then a row per kernel."""
    names = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
             "gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
             "sm__warps_active.avg.pct_of_peak_sustained_active", "sm__maximum_warps_per_active_cycle_pct",
             "launch__registers_per_thread", "launch__occupancy_limit_registers",
             STALL.format("long_scoreboard"), STALL.format("barrier"), STALL.format("lg_throttle")]
    units = ["", "", "", "", "", "", "", "ns", "%", "%", "%", "register/thread", "block", "", "", ""]
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(names)
    w.writerow(units)
    for i, (kernel, values) in enumerate(kernels):
        w.writerow([str(i), "42", "python3", "127.0.0.1", kernel, "1", "7"] + [values.get(n, "") for n in names[7:]])
    return "==PROF== Connected to process 42\n" + buf.getvalue() + "==PROF== Disconnected from process 42\n"


def kernel(duration_ns: str, dram: str, long_sb: str, barrier: str) -> dict[str, str]:
    return {"gpu__time_duration.sum": duration_ns, "dram__throughput.avg.pct_of_peak_sustained_elapsed": dram,
            "sm__warps_active.avg.pct_of_peak_sustained_active": "61.5", "sm__maximum_warps_per_active_cycle_pct": "75",
            "launch__registers_per_thread": "40", "launch__occupancy_limit_registers": "6",
            STALL.format("long_scoreboard"): long_sb, STALL.format("barrier"): barrier, STALL.format("lg_throttle"): "0.5"}


def test_the_raw_page_becomes_one_summary_per_kernel_paired_with_its_cell(profile):
    cells = [profile.parse_cell("RMSNorm:16384x768"), profile.parse_cell("AddRMSNorm:16384x768@128x1x2")]
    text = raw_page([
        ("normfuse_rms_norm_t128_r2_c1", kernel("55100", "31.2", "20.5", "3.25")),
        ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16>(...)", kernel("27,300", "63", "9", "1")),
        ("normfuse_add_rms_norm_t128_r4_c1", kernel("60000", "70", "2", "12")),
        ("void at::native::elementwise_kernel<...>", kernel("1000", "5", "1", "0")),
        ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16>(...)", kernel("30000", "60", "8", "1")),
    ])
    rows = profile.read_raw_csv(text)
    assert [r["ID"] for r in rows] == ["0", "1", "2", "3", "4"]  # banner and units row dropped
    kernels = profile.label_kernels(rows, cells)
    assert [(k["op"], k["impl"], k["layout"]) for k in kernels] == [
        ("RMSNorm", "normfuse", "table"), ("RMSNorm", "torch", "table"), ("AddRMSNorm", "normfuse", "128x1x2"),
        ("AddRMSNorm", "torch", "128x1x2"), ("AddRMSNorm", "torch", "128x1x2")]
    first = kernels[0]
    assert first["duration_us"] == pytest.approx(55.1) and kernels[1]["duration_us"] == pytest.approx(27.3)
    assert (first["dram_pct_of_peak"], first["registers"], first["block_limit_registers"]) == (31.2, 40, 6)
    assert [name for name, _ in first["top_stalls"]] == ["long_scoreboard", "barrier", "lg_throttle"]
    assert [name for name, _ in kernels[2]["top_stalls"]][0] == "barrier"
    table = profile.report(kernels, "bfloat16")
    assert "| RMSNorm | 16384x768 | table | normfuse | 55.10 | 31.2 | 61.5 / 75.0 | 40 | 6 | long_scoreboard 20.5" in table


def test_a_metric_the_ncu_version_lacks_reads_n_a(profile):
    text = raw_page([("normfuse_rms_norm_t128_r2_c1", {"gpu__time_duration.sum": "1000"})])
    [k] = profile.label_kernels(profile.read_raw_csv(text), [profile.parse_cell("RMSNorm:4x768")])
    assert k["duration_us"] == 1.0 and k["dram_pct_of_peak"] is None and k["top_stalls"] == []
    assert "| n/a / n/a |" in profile.report([k], "bfloat16")


def test_kernels_that_do_not_match_the_cells_are_refused(profile):
    cells = [profile.parse_cell("RMSNorm:4x768"), profile.parse_cell("RMSNorm:8x768")]
    only_one = raw_page([("normfuse_rms_norm_t128_r2_c1", {}), ("torch_kernel", {})])
    with pytest.raises(profile.ProfileError, match="1 normfuse kernels were profiled for 2 cells"):
        profile.label_kernels(profile.read_raw_csv(only_one), cells)
    torch_first = raw_page([("torch_kernel", {})])
    with pytest.raises(profile.ProfileError, match="does not follow a normfuse launch"):
        profile.label_kernels(profile.read_raw_csv(torch_first), cells)


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_profile.py"), *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_without_ncu_or_with_a_bad_cell_it_says_so_in_one_line(tmp_path):
    bad = run_script("RMSNorm:16384", "--out", str(tmp_path))
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: cell 'RMSNorm:16384'")
    no_ncu = run_script("RMSNorm:16384x768", "--out", str(tmp_path), NCU="", PATH="/usr/bin:/bin")
    assert no_ncu.returncode == 1 and "error: ncu (Nsight Compute) is not on PATH" in no_ncu.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written
