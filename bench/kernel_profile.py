"""Nsight Compute's view of a few cells: why a kernel falls short of the copy bandwidth.

    python bench/kernel_profile.py --out DIR RMSNorm:16384x768 RMSNorm:16384x768@128x1x4 RMSNorm:16384x4096

Each cell is OP:TOKENSxHIDDEN, optionally @TPRxC[xK] to force a layout (as --tune names them); the
launch table decides otherwise. The script runs itself under `ncu` (on PATH, or $NCU): in each
cell normfuse's kernel and then torch's fused norm of the same input (F.rms_norm / F.layer_norm;
for the Add forms, of the sum, so that only the norm is compared) are launched once each, between
cudaProfilerStart and cudaProfilerStop, and profiled with the sections below, at the GPU's own
clocks (--clock-control none) and with caches flushed before each replay pass (ncu's default, as
bench/kernels.py flushes L2). Compare kernels within a profile; take durations from bench/kernels.py.
Writes to DIR: profile.ncu-rep (for Nsight Compute's GUI), ncu-raw.csv (every metric collected, one
row per kernel), profile.json and profile.md (per kernel: duration, DRAM throughput, achieved and
theoretical occupancy, registers, the block limit from registers, and the largest warp stall
reasons). Needs a GPU, torch with CUDA, CuPy and ncu with access to the GPU's performance counters.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.files import write_text  # noqa: E402
from normops import OPS  # noqa: E402

SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "MemoryWorkloadAnalysis")
_CELL = re.compile(r"(?P<op>\w+):(?P<tokens>\d+)x(?P<hidden>\d+)(?:@(?P<layout>\d+(?:x\d+){1,2}))?")

# Raw-page metric names -> the summary's columns. Looked up by name, each may be missing (a
# different ncu version): the summary then says n/a and the raw CSV still holds everything.
SUMMARY = {
    "duration_us": ("gpu__time_duration.sum", 1e-3),  # ns
    "dram_pct_of_peak": ("dram__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", 1),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct", 1),
    "registers": ("launch__registers_per_thread", 1),
    "block_limit_registers": ("launch__occupancy_limit_registers", 1),
    "waves_per_sm": ("launch__waves_per_multiprocessor", 1),
}
# Warp stall reasons asked for by name (the sections' own set differs between ncu versions).
STALL_REASONS = ("long_scoreboard", "lg_throttle", "barrier", "wait", "short_scoreboard", "mio_throttle",
                 "not_selected", "math_pipe_throttle", "drain")
_STALL = re.compile(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio")


class ProfileError(Exception):
    pass


def parse_cell(text: str) -> dict:
    m = _CELL.fullmatch(text)
    if not m or m["op"] not in OPS:
        raise ProfileError(f"cell {text!r}: expected OP:TOKENSxHIDDEN[@TPRxC[xK]] with OP one of {', '.join(OPS)}")
    layout = tuple(int(n) for n in m["layout"].split("x")) if m["layout"] else None
    return {"op": m["op"], "tokens": int(m["tokens"]), "hidden": int(m["hidden"]), "layout": layout}


def ncu_commands(ncu: str, report: Path, argv: list[str]) -> tuple[list[str], list[str]]:
    """(profile, export): ncu around this script (re-run with --inside-ncu), profiling only the
    launches between cudaProfilerStart and Stop into `report` (.ncu-rep); then that report's raw
    page as CSV, one row per kernel, in base units (ns, bytes), which needs no GPU."""
    sections = [a for s in SECTIONS for a in ("--section", s)]
    metrics = ",".join(f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in STALL_REASONS)
    # --clock-control none: the GPU's own clocks, as bench/kernels.py times it (and the setting seen
    # working on the lent machines; ncu's default locks them to base)
    profile = [ncu, "--profile-from-start", "off", "--target-processes", "all", "--clock-control", "none",
               *sections, "--metrics", metrics,
               "--export", str(report), "--force-overwrite",
               sys.executable, str(Path(__file__).resolve()), "--inside-ncu", *argv]
    export = [ncu, "--import", str(report), "--page", "raw", "--csv", "--print-units", "base"]
    return profile, export


def read_raw_csv(text: str) -> list[dict[str, str]]:
    """ncu's raw page as one dict per kernel: the log also holds ==PROF== lines, and the row after
    the header gives units, not a kernel."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    return [r for r in rows if (r.get("ID") or "").strip().isdigit()]


def _number(value: str | None) -> float | None:
    try:
        return float((value or "").replace(",", ""))
    except ValueError:
        return None


def summarise_kernel(row: dict[str, str], top: int = 5) -> dict:
    out: dict = {"kernel": row.get("Kernel Name", "?")}
    for key, (metric, scale) in SUMMARY.items():
        v = _number(row.get(metric))
        out[key] = None if v is None else v * scale
    stalls = {m.group(1): v for name, value in row.items() if name and (m := _STALL.fullmatch(name))
              and (v := _number(value)) is not None}
    out["top_stalls"] = sorted(stalls.items(), key=lambda kv: -kv[1])[:top]  # warp cycles per issued instruction
    return out


def label_kernels(rows: list[dict[str, str]], cells: list[dict]) -> list[dict]:
    """Pair the profiled kernels, in launch order, with the cells: each cell launched normfuse's
    kernel, then torch's (which may be more than one kernel)."""
    out, cell = [], -1
    for row in rows:
        name = row.get("Kernel Name", "")
        if name.startswith("normfuse_"):
            cell += 1
            impl = "normfuse"
        else:
            impl = "torch"
        if not 0 <= cell < len(cells):
            raise ProfileError(f"profiled kernel {name!r} does not follow a normfuse launch of the {len(cells)} cells")
        out.append({**cell_label(cells[cell]), "impl": impl, **summarise_kernel(row)})
    if cell != len(cells) - 1:
        raise ProfileError(f"{cell + 1} normfuse kernels were profiled for {len(cells)} cells")
    return out


def cell_label(cell: dict) -> dict:
    layout = "x".join(map(str, cell["layout"])) if cell["layout"] else "table"
    return {"op": cell["op"], "tokens": cell["tokens"], "hidden": cell["hidden"], "layout": layout}


def report(kernels: list[dict], dtype: str) -> str:
    def fmt(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)
    lines = [f"ncu, {dtype}; stalls: warp cycles per issued instruction, largest first",
             "| op | tokens x hidden | layout | impl | us | DRAM % peak | occupancy % (achieved / theoretical) "
             "| registers | blocks/SM by registers | top stalls |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        stalls = ", ".join(f"{n} {v:.1f}" for n, v in k["top_stalls"]) or "n/a"
        lines.append(f"| {k['op']} | {k['tokens']}x{k['hidden']} | {k['layout']} | {k['impl']} | "
                     f"{fmt(k['duration_us'], '.2f')} | {fmt(k['dram_pct_of_peak'])} | "
                     f"{fmt(k['achieved_occupancy_pct'])} / {fmt(k['theoretical_occupancy_pct'])} | "
                     f"{fmt(k['registers'], '.0f')} | {fmt(k['block_limit_registers'], '.0f')} | {stalls} |")
    return "\n".join(lines)


def launch_cells(cells: list[dict], dtype: str) -> None:
    """Inside ncu: prepare every cell (modules loaded, inputs written), then launch normfuse's kernel
    and torch's fused norm of each once, between cudaProfilerStart and Stop."""
    import torch
    import torch.nn.functional as F

    from kernel_grid import EPS
    from kernel_timing import normfuse_launch, tensors

    prepared = []
    for cell in cells:
        spec = OPS[cell["op"]]
        x, res, gamma, beta = tensors(cell["op"], dtype, cell["tokens"], cell["hidden"])
        ours, _, outs = normfuse_launch(cell["op"], x, res, gamma, beta, layout=cell["layout"])
        s = x + res if spec.has_residual else x
        if spec.centered:
            def theirs(s=s, gamma=gamma, beta=beta):
                return F.layer_norm(s, (s.shape[-1],), gamma, beta, EPS)
        else:
            def theirs(s=s, gamma=gamma):
                return F.rms_norm(s, (s.shape[-1],), gamma, EPS)
        prepared.append((ours, theirs, outs[0]))
    for ours, theirs, _ in prepared:  # warm: lazy loading and torch's first-call work stay outside
        ours()
        theirs()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for ours, theirs, _ in prepared:
        ours()
        theirs()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    for (_, theirs, y), cell in zip(prepared, cells):  # a profile of a wrong kernel would mislead
        expected = theirs()
        diff = float((y.float() - expected.float()).abs().max())
        print(f"{cell['op']} {cell['tokens']}x{cell['hidden']}: max |normfuse - torch| = {diff:.3g}", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", nargs="+", help="OP:TOKENSxHIDDEN[@TPRxC[xK]]")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/profile)")
    p.add_argument("--inside-ncu", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        cells = [parse_cell(c) for c in args.cells]
    except ProfileError as exc:
        sys.exit(f"error: {exc}")
    if args.inside_ncu:
        launch_cells(cells, args.dtype)
        return 0
    ncu = os.environ.get("NCU") or shutil.which("ncu")
    if not ncu:
        sys.exit("error: ncu (Nsight Compute) is not on PATH; set $NCU to its path")
    out = args.out or ROOT / "bench" / "results" / "profile"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="normfuse-ncu-") as tmp:
        report_path = Path(tmp) / "profile.ncu-rep"
        profile, export = ncu_commands(ncu, report_path, [a for a in argv if a != "--inside-ncu"])
        done = subprocess.run(profile)
        if done.returncode != 0 or not report_path.exists():
            sys.exit(f"error: ncu exited {done.returncode} without a report (no GPU, or no access to its "
                     "performance counters: ERR_NVGPUCTRPERM)")
        exported = subprocess.run(export, capture_output=True, text=True)
        text = exported.stdout
        if exported.returncode != 0 or not text.strip():
            sys.exit(f"error: ncu --import exited {exported.returncode}: {exported.stderr.strip()[-500:]}")
        shutil.copyfile(report_path, out / "profile.ncu-rep")  # for the Nsight Compute GUI
    write_text(out / "ncu-raw.csv", text)
    try:
        kernels = label_kernels(read_raw_csv(text), cells)
    except ProfileError as exc:
        sys.exit(f"error: {exc}; the raw CSV is in {out / 'ncu-raw.csv'}")
    table = report(kernels, args.dtype)
    write_text(out / "profile.json", json.dumps({"dtype": args.dtype, "sections": SECTIONS, "kernels": kernels},
                                               indent=1))
    write_text(out / "profile.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
