"""Turn a layout sweep of bench/kernels.py (--tune) into the launch table of plugins/config.py.

    python bench/kernel_tune.py bench/results/<gpu>-kernels-quick-tune.json            # print
    python bench/kernel_tune.py RESULTS.json --tokens 16384 65536 --apply             # rewrite TUNED

For each (op, dtype, hidden) of the sweep, every timed layout ("normfuse[TPRxC]" or, for a
row-loop variant, "normfuse[TPRxCxK]") is scored by its median time (L2 flushed) over the time of
the layout the table picks now (its own sweep cell, else the run's "normfuse" cell), as a geometric
mean over the selected token counts. A layout whose outputs disagreed with the table kernel's in
that run (kernels.py records it per cell) is never chosen.
The best layout replaces the table's entry only when it is faster by more than --margin (default
2%), so that timing noise alone never rewrites the table. No GPU: it reads the JSON only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernel_grid import layout_label, layout_of_label  # noqa: E402
from plugins import config  # noqa: E402

CONFIG_PATH = ROOT / "plugins" / "config.py"
TABLE_BLOCK = re.compile(r"^TUNED: dict\[.*?\n\}\n", re.S | re.M)


def current_layout(op: str, dtype: str, hidden: int) -> tuple[int, ...]:
    cfg = config.launch_config(op, dtype, 1, hidden)
    return (cfg.threads_per_row, cfg.slots) + ((cfg.rows_per_group,) if cfg.rows_per_group > 1 else ())


def best_layouts(rows: list[dict], tokens: set[int] | None = None, margin: float = 0.02) -> list[dict]:
    """One decision per (op, dtype, hidden): the current layout, the best one and its time ratio."""
    cells: dict[tuple[str, str, int], dict[int, dict[str, float]]] = {}
    for r in rows:
        if tokens is not None and r["tokens"] not in tokens:
            continue
        if r["impl"] != "normfuse" and layout_of_label(r["impl"]) is None:
            continue
        if not isinstance(r.get("median_us"), (int, float)) or not math.isfinite(r["median_us"]):
            continue  # a cell that failed to run
        if r.get("agrees_with_table") is False:
            continue  # a layout whose outputs were wrong: fast at computing something else
        cells.setdefault((r["op"], r["dtype"], r["hidden"]), {}).setdefault(r["tokens"], {})[r["impl"]] = r["median_us"]
    decisions = []
    for (op, dtype, hidden), all_tokens in sorted(cells.items()):
        # token counts with a sweep (kernels.py sweeps only at tokens >= 4096)
        by_tokens = {t: timed for t, timed in all_tokens.items() if any(layout_of_label(i) for i in timed)}
        now = current_layout(op, dtype, hidden)
        now_label = layout_label(now)
        scores: dict[tuple[int, ...], dict[int, float]] = {}  # layout -> tokens -> time ratio
        for t, timed in by_tokens.items():
            # against the table's layout now (the run's default cell if the sweep lacks it)
            base = timed.get(now_label) or timed.get("normfuse")
            if not base:
                continue
            for impl, us in timed.items():
                layout = layout_of_label(impl)
                if layout is not None:  # the fastest of cells naming one layout twice
                    scores.setdefault(layout, {})[t] = min(us / base, scores.get(layout, {}).get(t, math.inf))
        complete = {lo: math.exp(sum(map(math.log, r.values())) / len(r)) for lo, r in scores.items()
                    if len(r) == len(by_tokens)}  # timed at every selected token count
        if not complete:
            continue
        best = min(complete, key=complete.__getitem__)
        ratio = complete[best]
        chosen = best if ratio < 1 - margin and best != now else now
        decisions.append({"op": op, "dtype": dtype, "hidden": hidden, "current": list(now), "best": list(best),
                          "best_time_ratio": ratio, "chosen": list(chosen), "changed": chosen != now,
                          "tokens": sorted(by_tokens)})
    return decisions


def tuned_table(decisions: list[dict]) -> dict[tuple[str, str], dict[int, tuple[int, ...]]]:
    """config.TUNED with the decisions' entries replaced or added."""
    table = {key: dict(entries) for key, entries in config.TUNED.items()}
    for d in decisions:
        table.setdefault((d["op"], d["dtype"]), {})[d["hidden"]] = tuple(d["chosen"])
    return table


def table_source(table: dict[tuple[str, str], dict[int, tuple[int, ...]]]) -> str:
    """The TUNED assignment as plugins/config.py writes it."""
    lines = ["TUNED: dict[tuple[str, str], dict[int, tuple[int, ...]]] = {"]
    for (op, dtype), entries in table.items():
        body = ", ".join(f"{h}: ({', '.join(map(str, lo))})" for h, lo in sorted(entries.items()))
        lines.append(f'    ("{op}", "{dtype}"): {{{body}}},')
    return "\n".join(lines) + "\n}\n"


def apply(table: dict, path: Path = CONFIG_PATH) -> None:
    """Rewrite the TUNED assignment in `path` (written to a temporary file, then renamed)."""
    text = path.read_text()
    if len(TABLE_BLOCK.findall(text)) != 1:
        raise SystemExit(f"{path}: expected exactly one 'TUNED: dict[...] = {{ ... }}' block")
    new = TABLE_BLOCK.sub(lambda _: table_source(table), text)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def report(decisions: list[dict]) -> str:
    out = ["| op | dtype | hidden | table now | best measured | time vs now | table after |",
           "|---|---|---|---|---|---|---|"]
    fmt = lambda lo: "x".join(map(str, lo))  # noqa: E731
    for d in decisions:
        out.append(f"| {d['op']} | {d['dtype']} | {d['hidden']} | {fmt(d['current'])} | {fmt(d['best'])} | "
                   f"{d['best_time_ratio']:.3f} | {fmt(d['chosen'])}{' (changed)' if d['changed'] else ''} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by bench/kernels.py --tune")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts to score over (default: all with a sweep)")
    p.add_argument("--margin", type=float, default=0.02, help="least time saved to change an entry (default 0.02)")
    p.add_argument("--apply", action="store_true", help=f"rewrite TUNED in {CONFIG_PATH.relative_to(ROOT)}")
    args = p.parse_args(argv)
    rows = []
    for path in args.results:
        try:
            rows += json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"{path}: not a bench/kernels.py results file ({exc.__class__.__name__}: {exc})")
    decisions = best_layouts(rows, set(args.tokens) if args.tokens else None, args.margin)
    if not decisions:
        raise SystemExit("no layout sweep in these results: run bench/kernels.py with --tune")
    print(report(decisions))
    if args.apply:
        apply(tuned_table(decisions))
        print(f"rewrote TUNED in {CONFIG_PATH} ({sum(d['changed'] for d in decisions)} entries changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
