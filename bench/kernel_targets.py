"""Judge the kernels' targets from bench/kernels.py results (no GPU: it reads the JSON only).

    python bench/kernel_targets.py bench/results/h100-80gb-hbm3-kernels.json
    python bench/kernel_targets.py RUN1.json RUN2.json --out DIR --check     # exit 1 if one is missed

Every figure is compared with the references of its own run (file): copy bandwidth and the empty
launch are measured in the same run as the kernels, and a ratio across runs would mix clocks and
L2 states. The verdict is the launch table's kernel's ("normfuse", what the plugins run). Beside
it, the fastest other layout the run timed (--tune, --tactics, --split) whose outputs agreed with
the table kernel's: a target that only such a layout meets is a change of the launch table (or of
TensorRT's tactics) away. And where the launch table has changed since the run (plugins/config.py
now picks another kernel for the cell), the verdict of today's table: from the same run's timing
of that kernel when the run's sweep timed it, else "not timed". Where a cell was timed in several
files, each file gives its own row.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.files import write_text  # noqa: E402
from plugins import config  # noqa: E402


@dataclass(frozen=True)
class BandwidthTarget:
    ops: tuple[str, ...]
    min_copy_fraction: float  # of the device-to-device copy bandwidth measured in the same run
    min_speedup_vs_torch: float | None  # time of torch's fused kernel over ours; None: no such target


# The targets, in one place. Bandwidth: bf16, tokens >= 4096, hidden 4096 and 8192.
BANDWIDTH_TARGETS = (
    BandwidthTarget(("RMSNorm", "AddRMSNorm"), 0.90, 1.10),
    BandwidthTarget(("LayerNorm", "AddLayerNorm"), 0.85, None),
)
BANDWIDTH_DTYPE, BANDWIDTH_MIN_TOKENS, BANDWIDTH_HIDDEN = "bfloat16", 4096, (4096, 8192)
# Decode: tokens <= 32, within this many microseconds of an empty kernel launched the same way
# (both after an L2 flush; both with L2 warm, where the run timed it so).
DECODE_MAX_TOKENS, DECODE_MAX_OVER_EMPTY_US = 32, 2.0
# impls that are other launch layouts of normfuse's kernels (bench/kernels.py's names)
ALTERNATIVE_PREFIXES = ("normfuse[", "tactic", "split[")


def alternatives(cell: dict[str, dict]) -> dict[str, dict]:
    """The other layouts a cell timed whose outputs agreed with the table kernel's."""
    return {impl: r for impl, r in cell.items()
            if impl.startswith(ALTERNATIVE_PREFIXES) and r.get("agrees_with_table", True)}


def fastest(rows: dict[str, dict]) -> tuple[str, dict] | None:
    return min(rows.items(), key=lambda item: item[1]["median_us"]) if rows else None


def todays_table(op: str, dtype: str, tokens: int, hidden: int, cell: dict[str, dict], verdict) -> dict | None:
    """The kernel today's launch table runs for this cell, whether the run ran that very kernel as
    its table's ("same"), and, where the run timed it (as the table's kernel or as an agreeing other
    layout), verdict(its row). None for a file that does not name its kernels (nothing to match)."""
    if "kernel" not in cell["normfuse"]:
        return None
    kernel = config.launch_config(op, dtype, tokens, hidden).kernel
    rows = {"normfuse": cell["normfuse"], **alternatives(cell)}
    timed = next((r for r in rows.values() if r.get("kernel") == kernel), None)
    out = {"kernel": kernel, "same": timed is cell["normfuse"]}
    if timed is not None:
        out.update(verdict(timed))
    return out


def judge(data: dict, source: str = "") -> list[dict]:
    """One verdict per target cell of one bench/kernels.py results file."""
    copy = data["copy"]["tbps"]
    empty = {"flushed": data["empty_launch"]["median_us"],
             "warm": (data.get("empty_launch_l2_warm") or {}).get("median_us")}
    cells: dict[tuple, dict[str, dict]] = {}
    for r in data["results"]:
        cells.setdefault((r["op"], r["dtype"], r["tokens"], r["hidden"]), {})[r["impl"]] = r
    out = []
    for (op, dtype, tokens, hidden), cell in sorted(cells.items()):
        table = cell.get("normfuse")
        if table is None:
            continue
        base = {"source": source, "flush": data.get("flush", "dirty"), "op": op, "dtype": dtype,
                "tokens": tokens, "hidden": hidden}
        best = fastest(alternatives(cell))
        if tokens >= BANDWIDTH_MIN_TOKENS and hidden in BANDWIDTH_HIDDEN and dtype == BANDWIDTH_DTYPE:
            target = next((t for t in BANDWIDTH_TARGETS if op in t.ops), None)
            if target is None:
                continue
            torch_fused = cell.get("torch_fused")

            def verdict(r: dict) -> dict:
                fraction = r["tbps"] / copy
                speedup = torch_fused["median_us"] / r["median_us"] if torch_fused else None
                met = fraction >= target.min_copy_fraction and (
                    target.min_speedup_vs_torch is None or (speedup is not None and speedup >= target.min_speedup_vs_torch))
                return {"copy_fraction": fraction, "speedup_vs_torch": speedup, "met": met}

            required = f">= {target.min_copy_fraction:.0%} of copy" + (
                f", >= {target.min_speedup_vs_torch:.2f}x torch" if target.min_speedup_vs_torch else "")
            same_size = table.get("same_size_copy_tbps")
            row = {**base, "target": "bandwidth", "required": required, "copy_tbps": copy,
                   "tbps": table["tbps"], **verdict(table),
                   # for context only: a copy of the cell's own bytes pays the same launch ramp and flush
                   "same_size_copy_fraction": table["tbps"] / same_size if same_size else None}
            if best:
                row["best_alternative"] = {"impl": best[0], "tbps": best[1]["tbps"], **verdict(best[1])}
            row["table_now"] = todays_table(op, dtype, tokens, hidden, cell, lambda r: {"tbps": r["tbps"], **verdict(r)})
            out.append(row)
        elif tokens <= DECODE_MAX_TOKENS:
            over = table["median_us"] - empty["flushed"]
            warm = cell.get("normfuse_l2_warm")
            over_warm = warm["median_us"] - empty["warm"] if warm and empty["warm"] is not None else None
            met = over <= DECODE_MAX_OVER_EMPTY_US and (over_warm is None or over_warm <= DECODE_MAX_OVER_EMPTY_US)
            row = {**base, "target": "decode", "required": f"<= {DECODE_MAX_OVER_EMPTY_US:g} us over an empty launch",
                   "median_us": table["median_us"], "over_empty_us": over, "over_empty_warm_us": over_warm, "met": met}

            def flushed(r: dict) -> dict:
                over_r = r["median_us"] - empty["flushed"]
                return {"median_us": r["median_us"], "over_empty_us": over_r, "met": over_r <= DECODE_MAX_OVER_EMPTY_US}

            if best:
                row["best_alternative"] = {"impl": best[0], **flushed(best[1])}
            # (another layout has no L2-warm timing: judged after the flush only)
            row["table_now"] = todays_table(op, dtype, tokens, hidden, cell,
                                            lambda r: {**flushed(r), "met": met} if r is table else flushed(r))
            out.append(row)
    return out


def today(v: dict) -> str:
    """The "today's table" cell of a verdict's row: "same" where the launch table still runs the
    run's kernel, else today's layout and its verdict from the run's timing of it."""
    t = v.get("table_now")
    if t is None:
        return "-"
    if t["same"]:
        return "same"
    layout = re.search(r"_(t\d+_r\d+_c\d+(?:_s\d+)?)$", t["kernel"])
    name = layout.group(1) if layout else t["kernel"]
    if "met" not in t:
        return f"{name}: not timed"
    figure = f"{t['copy_fraction']:.0%}" if "copy_fraction" in t else f"{t['over_empty_us']:+.2f}"
    return f"{name}: {figure}" + (" (met)" if t["met"] else "")


def changed_since(v: dict) -> bool:
    """Whether today's launch table runs another kernel in this cell than the run's table did."""
    return bool(v.get("table_now")) and not v["table_now"]["same"]


def summary(target: str, rows: list[dict]) -> str:
    line = f"{target}: {sum(v['met'] for v in rows)} of {len(rows)} cells met by the launch table's kernel"
    changed = [v for v in rows if changed_since(v)]
    if changed:
        # an unchanged cell keeps its verdict; a changed one not timed in the run counts as missed
        met_now = sum(v["table_now"].get("met", False) if changed_since(v) else v["met"] for v in rows)
        untimed = sum("met" not in v["table_now"] for v in changed)
        line += (f"; by today's launch table, {met_now} (its kernel changed since the run in {len(changed)} cells"
                 + (f", {untimed} of them not timed in the run" if untimed else ", all timed in the run") + ")")
    return line


def report(verdicts: list[dict]) -> str:
    lines = []
    for target in ("bandwidth", "decode"):
        rows = [v for v in verdicts if v["target"] == target]
        if not rows:
            continue
        lines += ["", summary(target, rows)]
        if target == "bandwidth":
            lines += ["| run | op | dtype | tokens x hidden | required | TB/s | % copy | % same-size copy | vs torch | met | "
                      "best other layout | today's table |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for v in rows:
                speed = f"{v['speedup_vs_torch']:.2f}x" if v["speedup_vs_torch"] is not None else "-"
                same = f"{v['same_size_copy_fraction']:.0%}" if v["same_size_copy_fraction"] is not None else "-"
                alt = v.get("best_alternative")
                other = (f"{alt['impl']}: {alt['copy_fraction']:.0%}"
                         + (f", {alt['speedup_vs_torch']:.2f}x" if alt["speedup_vs_torch"] is not None else "")
                         + (" (met)" if alt["met"] else "")) if alt else "-"
                lines.append(f"| {v['source']} | {v['op']} | {v['dtype']} | {v['tokens']}x{v['hidden']} | {v['required']} | "
                             f"{v['tbps']:.2f} | {v['copy_fraction']:.0%} | {same} | {speed} | {'yes' if v['met'] else 'NO'} | "
                             f"{other} | {today(v)} |")
        else:
            lines += [f"required: {rows[0]['required']}, after an L2 flush and, where timed, with L2 warm",
                      "| run | op | dtype | tokens x hidden | us | over empty (L2 flushed) | over empty (L2 warm) | met | "
                      "best other layout | today's table |", "|---|---|---|---|---|---|---|---|---|---|"]
            for v in rows:
                warm = f"{v['over_empty_warm_us']:+.2f}" if v["over_empty_warm_us"] is not None else "-"
                alt = v.get("best_alternative")
                other = (f"{alt['impl']}: {alt['over_empty_us']:+.2f}" + (" (met)" if alt["met"] else "")) if alt else "-"
                lines.append(f"| {v['source']} | {v['op']} | {v['dtype']} | {v['tokens']}x{v['hidden']} | {v['median_us']:.2f} | "
                             f"{v['over_empty_us']:+.2f} | {warm} | {'yes' if v['met'] else 'NO'} | {other} | {today(v)} |")
    return "\n".join(lines[1:])


def load(path: Path) -> dict | None:
    """A results file (or the partial.json of a run stopped early, which holds its run's
    references too); None, said on stderr, for an A/B run of kernel sources, which has no table
    kernel to judge."""
    try:
        data = json.loads(path.read_text())
        if "variants" in data:
            print(f"{path}: skipped, an A/B run of kernel sources (--sources)", file=sys.stderr)
            return None
        data["copy"]["tbps"], data["empty_launch"]["median_us"], data["results"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a bench/kernels.py results file ({exc.__class__.__name__}: {exc})")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by bench/kernels.py")
    p.add_argument("--out", type=Path, help="also write kernel-targets.json and kernel-targets.md here")
    p.add_argument("--check", action="store_true", help="exit 1 when a target cell is missed")
    args = p.parse_args(argv)
    verdicts = []
    for path in args.results:
        data = load(path)
        if data is not None:
            verdicts += judge(data, source=path.stem if path.stem != "partial" else f"{path.parent.name}/partial")
    if not verdicts:
        raise SystemExit("no target cells in these results (bf16 at tokens >= 4096 and hidden 4096/8192, or tokens <= 32)")
    table = report(verdicts)
    print(table)
    if args.out:
        write_text(args.out / "kernel-targets.json", json.dumps({"verdicts": verdicts}, indent=1) + "\n")
        write_text(args.out / "kernel-targets.md", table + "\n")
    return 1 if args.check and not all(v["met"] for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
