"""Time the normfuse kernels on a GPU against copy bandwidth and torch's implementations.

    python bench/kernels.py --out bench/results            # the full tokens x hidden x dtype grid
    python bench/kernels.py --quick --tune --out DIR       # target shapes only, plus a layout sweep

Each cell is timed with CUDA events around one launch, after writing a 256 MB buffer so that L2
(50 MB on an H100) holds none of the inputs; the median of many runs is reported, the raw times
are kept. Bandwidth counts the bytes that must move: x [+ residual], gamma [+ beta] read,
y [+ sum] written. In the same run: device-to-device copy bandwidth (torch copy_ of 1 GiB),
an empty kernel launched through the same path as ours (the floor for decode shapes),
torch's fused F.rms_norm / F.layer_norm (the Add forms add first), the unfused decomposition
that the reference ONNX graph runs (normops.torch_modules' maths), and torch.compile of it.
Writes <out>/<gpu>-kernels.{json,md,png} (-kernels-quick, -kernels-tune or -kernels-quick-tune with
--quick and --tune). Every other layout a cell times (--tune, --tactics, --split) has its outputs
compared with the table kernel's on the same inputs; one outside twice the op tolerance is flagged
on the terminal and in the report, and left out of the tables and of bench/kernel_tune.py's choice.

Kernel source versions side by side (A/B), in one run, on the same shapes and launch table:

    python bench/kernels.py --quick --sources HEAD,59deae0^ --out DIR
    python bench/kernels.py --quick --sources HEAD,HEAD+NORMFUSE_AB_NO_TRAILING_SYNC --out DIR
    python bench/kernels.py --sources HEAD,59deae0^ --static sm_90,sm_80     # no GPU: ptxas + SASS

Each --sources item is a git revision (its plugins/*.cu and norm_common.cuh, compiled with the
current plugins/build.py flags), "worktree" (plugins/ as it is) or a directory holding those files
(also --variant-dir; `--sources REV --save-sources DIR` writes a revision's files to DIR/<commit>
for a machine whose copy of the project has no git history), optionally followed by
+NAME[=VALUE] compile-time switches (the
NORMFUSE_AB_* list in plugins/norm_common.cuh). Every variant runs with the current
plugins/config.py launch shape; a variant whose entry point, parameters or launch bounds do not
fit it is refused with the reason ($NORMFUSE_AB_DEFINES does not apply here). Per cell, the variants are timed in alternation (one launch
of each per round, rotating the order), so clock and thermal drift fall on all of them alike.
Writes <out>/<gpu>-kernels-ab.{json,md}: every raw time, the median per variant, the median of
the per-round time ratios against the first variant, and the largest output difference from it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The benchmark and the one command line live here; the rest is in sibling modules, which import
# nothing from this one: kernel_grid (the cells), kernel_timing (CUDA-event timing, references),
# kernel_sources (--sources versions), kernel_ab (their timing side by side), kernel_static (--static).
from kernel_ab import report_variants, run_variants  # noqa: E402
from kernel_grid import (DTYPES, EPS, HIDDEN, SPLIT_MAX_TOKENS, TARGET_HIDDEN, candidate_layouts,  # noqa: E402
                         layout_label, moved_bytes, shapes, split_label)
from kernel_sources import VariantError, materialise, parse_sources, save_sources  # noqa: E402
from kernel_static import report_static, static_analysis  # noqa: E402
from kernel_timing import (FLUSH_MODES, SameSizeCopy, Timer, agreement, device_info,  # noqa: E402
                           normfuse_launch, reference_timings, summarise, tensors)
from export.files import atomic_path, write_text  # noqa: E402
from normops import OPS  # noqa: E402
from plugins import build, config  # noqa: E402


def unfused(op: str):
    """The maths of the reference graph (normops.torch_modules), one torch op at a time."""
    spec = OPS[op]

    def fn(x, res, gamma, beta):
        s = x + res if spec.has_residual else x
        h = s.float()
        if spec.centered:
            c = h - h.mean(-1, keepdim=True)
            h = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + EPS)
            y = h.to(x.dtype) * gamma + beta
        else:
            y = gamma * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
        return (y, s) if spec.has_residual else y
    return fn


def fused(op: str):
    spec = OPS[op]

    def fn(x, res, gamma, beta):
        s = x + res if spec.has_residual else x
        if spec.centered:
            y = F.layer_norm(s, (s.shape[-1],), gamma, beta, EPS)
        else:
            y = F.rms_norm(s, (s.shape[-1],), gamma, EPS)
        return (y, s) if spec.has_residual else y
    return fn


def run(args) -> dict:
    timer = Timer(args.flush)
    info = device_info()
    print("device:", info, flush=True)
    refs = reference_timings(timer)
    tokens_list, hidden_list, dtypes = shapes(args)
    rows = []
    compiled = {}
    # Every compiled function shares one code object (the closure in `unfused`), so dynamo's
    # per-code cache must hold all ops x dtypes x shape kinds, or it falls back to eager.
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    copy_tbps_for = SameSizeCopy(timer, args.budget)
    for dtype in dtypes:
        for op in args.ops or OPS:
            impls = {"torch_fused": fused(op), "torch_unfused": unfused(op)}
            if dtype in args.compile_dtypes:
                compiled.setdefault((op, dtype), torch.compile(unfused(op)))
                impls["torch_compile"] = compiled[(op, dtype)]
            for hidden in hidden_list:
                for tokens in tokens_list:
                    x, res, gamma, beta = tensors(op, dtype, tokens, hidden)
                    nbytes = moved_bytes(op, dtype, tokens, hidden)
                    copy_here = copy_tbps_for(nbytes)
                    fn, cfg, table_outs = normfuse_launch(op, x, res, gamma, beta)
                    cells = {"normfuse": (fn, cfg.kernel)}
                    alternatives = []  # (impl name, layout) timed beside the table's kernel
                    if args.tune and tokens >= 4096:
                        alternatives += [(layout_label(lo), lo) for lo in candidate_layouts(dtype, hidden)]
                    if args.tactics:  # tactic 1 is "normfuse" itself, the table's layout
                        alternatives += [(f"tactic{k}", lo) for k, lo in
                                         enumerate(config.tactic_layouts(op, dtype, hidden)[1:], start=2)]
                    if args.split and tokens <= SPLIT_MAX_TOKENS:  # clusters of blocks per row (sm_90+)
                        alternatives += [(split_label(lo), lo) for lo in config.split_layouts(dtype, hidden)]
                    # an alternative is prepared when its turn comes and its outputs are freed once
                    # compared, so that a dozen layouts of a 65536x16384 cell never hold outputs at once
                    layouts = dict(alternatives)
                    cells.update((name, None) for name in layouts)
                    for name, impl in impls.items():
                        cells[name] = ((lambda impl=impl: impl(x, res, gamma, beta)), None)
                    if tokens <= 32:
                        cells["normfuse_l2_warm"] = (fn, cfg.kernel)
                    first_row = len(rows)
                    for name, prepared in cells.items():
                        outs = None
                        try:
                            if name in layouts:
                                f, c2, outs = normfuse_launch(op, x, res, gamma, beta, layout=layouts[name])
                                kernel = c2.kernel
                            else:
                                f, kernel = prepared
                            t = timer.times_us(f, budget_s=args.budget, flush=not name.endswith("_l2_warm"))
                        except Exception as exc:  # e.g. out of memory for the unfused graph
                            print(f"  {name} failed: {exc.__class__.__name__}: {exc}", flush=True)
                            continue
                        med = summarise(t)
                        rows.append({"op": op, "dtype": dtype, "tokens": tokens, "hidden": hidden, "impl": name,
                                     "kernel": kernel, "bytes": nbytes, "median_us": med,
                                     "same_size_copy_tbps": copy_here,
                                     "tbps": nbytes / (med * 1e-6) / 1e12, "times_us": [round(v, 3) for v in t]})
                        if outs is not None:  # both kernels have run on these inputs: compare
                            rows[-1].update(agreement(outs, table_outs, dtype))
                            if not rows[-1]["agrees_with_table"]:
                                print(f"  {name} DISAGREES with the table's kernel (max |diff| "
                                      f"{rows[-1]['max_abs_diff_vs_table']:.3g}): its time is not a result", flush=True)
                        del f, outs
                    cell_rows = rows[first_row:]
                    mine = [r for r in cell_rows if r["impl"] == "normfuse"]
                    line = " ".join(f"{r['impl']}={r['tbps']:.2f}" for r in cell_rows)
                    print(f"{op:12s} {dtype:8s} {tokens:6d}x{hidden:<6d} {line}"
                          f" ({mine[0]['median_us']:.1f} us)" if mine else "", flush=True)
                    del x, res, gamma, beta, fn, cells, table_outs
                torch.cuda.empty_cache()
            if args.partial:
                # whole, if killed next; with the run's references, so that it can be judged alone
                write_text(args.partial, json.dumps({"device": info, "flush": args.flush, **refs, "results": rows}))
    return {"device": info, "flush": args.flush,
            "timing": f"CUDA events around one launch after a 256 MB L2 flush ({args.flush}); median",
            **refs, "results": rows}


def report(data: dict) -> str:
    rows = data["results"]
    copy = data["copy"]["tbps"]
    empty = data["empty_launch"]["median_us"]
    get = {(r["op"], r["dtype"], r["tokens"], r["hidden"], r["impl"]): r for r in rows}
    lines = [f"copy bandwidth {copy:.2f} TB/s; empty launch {empty:.2f} us; L2 flush before each launch: "
             f"{data.get('flush', 'dirty')}",
             "| op | dtype | tokens x hidden | normfuse TB/s | % copy | % same-size copy | torch fused TB/s | speed-up | unfused TB/s | compile TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, dtype, tokens, hidden, impl), r in sorted(get.items()):
        if impl != "normfuse" or tokens < 4096 or hidden not in TARGET_HIDDEN or dtype != "bfloat16":
            continue
        f = get.get((op, dtype, tokens, hidden, "torch_fused"))
        u = get.get((op, dtype, tokens, hidden, "torch_unfused"))
        c = get.get((op, dtype, tokens, hidden, "torch_compile"))
        lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {r['tbps']:.2f} | {100 * r['tbps'] / copy:.0f}% | "
                     f"{100 * r['tbps'] / r['same_size_copy_tbps']:.0f}% | "
                     f"{f['tbps'] if f else float('nan'):.2f} | {f['median_us'] / r['median_us'] if f else float('nan'):.2f}x | "
                     f"{u['tbps'] if u else float('nan'):.2f} | {c['tbps'] if c else float('nan'):.2f} |")
    lines += ["", "all dtypes, 16384 tokens: normfuse TB/s (torch fused TB/s)",
              "| op | dtype | " + " | ".join(str(h) for h in HIDDEN) + " |", "|---|---|" + "---|" * len(HIDDEN)]
    for op in OPS:
        for dtype in DTYPES:
            cells = []
            for h in HIDDEN:
                r, f = get.get((op, dtype, 16384, h, "normfuse")), get.get((op, dtype, 16384, h, "torch_fused"))
                cells.append(f"{r['tbps']:.2f} ({f['tbps']:.2f})" if r and f else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {op} | {dtype} | " + " | ".join(cells) + " |")
    warm = data["empty_launch_l2_warm"]["median_us"]
    lines += ["", f"decode (tokens <= 32): median us; empty launch {empty:.2f} us after an L2 flush, "
              f"{warm:.2f} us with L2 warm",
              "| op | dtype | tokens x hidden | L2 flushed | over empty | L2 warm | over empty |",
              "|---|---|---|---|---|---|---|"]
    for (op, dtype, tokens, hidden, impl), r in sorted(get.items()):
        if impl == "normfuse" and tokens <= 32:
            w = get.get((op, dtype, tokens, hidden, "normfuse_l2_warm"))
            wm = w["median_us"] if w else float("nan")
            lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {r['median_us']:.2f} | {r['median_us'] - empty:+.2f} | "
                         f"{wm:.2f} | {wm - warm:+.2f} |")
    return "\n".join(lines + disagreement_report(rows) + tactic_report(rows) + split_report(rows, empty))


def table_and_alternatives(rows: list[dict], prefix: str) -> dict[tuple, dict[str, dict]]:
    """{(op, dtype, tokens, hidden): {impl: row}} of the cells that timed the table's kernel
    ("normfuse") and at least one alternative layout whose impl name starts with `prefix` and whose
    outputs agreed with the table kernel's (disagreement_report lists the others)."""
    by_cell: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["impl"] == "normfuse" or (r["impl"].startswith(prefix) and r.get("agrees_with_table", True)):
            by_cell.setdefault((r["op"], r["dtype"], r["tokens"], r["hidden"]), {})[r["impl"]] = r
    return {key: impls for key, impls in by_cell.items() if len(impls) > 1 and "normfuse" in impls}


def disagreement_report(rows: list[dict]) -> list[str]:
    """Every alternative layout whose outputs were not those of the table's kernel on the same
    inputs: a wrong kernel, left out of the other tables and of bench/kernel_tune.py's choice."""
    wrong = [r for r in rows if r.get("agrees_with_table") is False]
    if not wrong:
        return []
    return ["", "LAYOUTS THAT DISAGREE with the table's kernel (outside twice the op tolerance; not results):",
            "| op | dtype | tokens x hidden | layout | kernel | max abs diff |", "|---|---|---|---|---|---|"] + [
        f"| {r['op']} | {r['dtype']} | {r['tokens']}x{r['hidden']} | {r['impl']} | {r['kernel']} | "
        f"{r['max_abs_diff_vs_table']:.3g} |" for r in sorted(wrong, key=lambda r: (r["op"], r["dtype"], r["tokens"], r["hidden"], r["impl"]))]


def tactic_report(rows: list[dict]) -> list[str]:
    """With --tactics: per cell, the median of each layout the TensorRT plugins offer as a tactic
    (L2 flushed) and the one TensorRT's autotuner would keep, timed the same way."""
    cells = table_and_alternatives(rows, "tactic")
    if not cells:
        return []
    lines = ["", "TensorRT tactics (plugins/config.tactic_layouts): median us after an L2 flush; tactic 1 is "
             "the launch table's layout", "| op | dtype | tokens x hidden | tactic: kernel us | fastest | saved vs table |",
             "|---|---|---|---|---|---|"]
    for (op, dtype, tokens, hidden), impls in sorted(cells.items()):
        named = {"tactic1" if impl == "normfuse" else impl: r for impl, r in impls.items()}
        timed = "; ".join(f"{name[6:]}: {r['kernel'].replace('normfuse_', '')} {r['median_us']:.2f}"
                          for name, r in sorted(named.items()))
        best = min(named, key=lambda name: named[name]["median_us"])
        saved = 1 - named[best]["median_us"] / named["tactic1"]["median_us"]
        lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {timed} | {best[6:]} | {saved:.0%} |")
    return lines


def split_report(rows: list[dict], empty_us: float) -> list[str]:
    """With --split: per cell, the launch table's one-block-per-row kernel against the fastest
    split-row layout (a cluster of S blocks per row), both L2 flushed, and each over an empty launch."""
    cells = table_and_alternatives(rows, "split[")
    if not cells:
        return []
    lines = ["", "split-row layouts (a cluster of S blocks per row, TPRxCxS): median us after an L2 flush",
             "| op | dtype | tokens x hidden | table us (over empty) | fastest split | split us (over empty) | "
             "speed-up | every split us |", "|---|---|---|---|---|---|---|---|"]
    for (op, dtype, tokens, hidden), impls in sorted(cells.items()):
        table = impls["normfuse"]["median_us"]
        splits = {name: r["median_us"] for name, r in impls.items() if name != "normfuse"}
        best = min(splits, key=splits.get)
        every = "; ".join(f"{name[6:-1]}: {us:.2f}" for name, us in sorted(splits.items()))
        lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {table:.2f} ({table - empty_us:+.2f}) | {best[6:-1]} | "
                     f"{splits[best]:.2f} ({splits[best] - empty_us:+.2f}) | {table / splits[best]:.2f}x | {every} |")
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["dtype"] == "bfloat16"]
    tokens = max(r["tokens"] for r in rows if r["tokens"] <= 16384)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, op in zip(axes, OPS):
        for impl in ("normfuse", "torch_fused", "torch_compile", "torch_unfused"):
            pts = sorted((r["hidden"], r["tbps"]) for r in rows
                         if r["op"] == op and r["impl"] == impl and r["tokens"] == tokens)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(data["copy"]["tbps"], color="grey", ls="--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op}, bf16, {tokens} tokens")
        ax.set_xlabel("hidden")
    axes[0].set_ylabel("TB/s (bytes that must move / time)")
    axes[0].legend(fontsize=8)
    fig.suptitle(data["device"]["name"])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results; "
                   "--static writes files only when given)")
    p.add_argument("--quick", action="store_true", help="bf16 target shapes and decode shapes only")
    p.add_argument("--tune", action="store_true", help="also time every sensible layout at tokens >= 4096")
    p.add_argument("--tactics", action="store_true",
                   help="also time the other layouts the TensorRT plugins offer as tactics, at every token count "
                        "(decode included): which one TensorRT's autotuner would keep for a profile")
    p.add_argument("--split", action="store_true",
                   help=f"also time the split-row layouts (a cluster of blocks per row; sm_90 and newer) at up to "
                        f"{SPLIT_MAX_TOKENS} tokens (with --sources: each version's, side by side; with --static: "
                        "their ptxas and SASS figures)")
    p.add_argument("--compile-dtypes", nargs="*", default=["bfloat16"], help="dtypes to time torch.compile on")
    p.add_argument("--dtypes", nargs="*", help="dtypes to run (default: bf16 with --quick, else all)")
    p.add_argument("--tokens", nargs="*", type=int, help="token counts to run (default: the grid)")
    p.add_argument("--hidden", nargs="*", type=int, help="hidden sizes to run (default: the grid)")
    p.add_argument("--ops", nargs="*", choices=list(OPS), help="ops to run (default: all)")
    p.add_argument("--flush", choices=FLUSH_MODES, default="dirty",
                   help="how L2 is emptied before each timed launch: dirty (write 256 MB, as triton's do_bench; "
                        "the timed kernel then writes L2's modified lines back) or clean (read 256 MB); "
                        "default dirty, as every committed result")
    p.add_argument("--budget", type=float, default=0.25, help="seconds of timing per cell (per variant with --sources)")
    p.add_argument("--sources", nargs="+", metavar="REV[+SWITCH...]",
                   help="time these kernel source versions side by side (comma- or space-separated): a git "
                        "revision, 'worktree' or a directory, each optionally +NAME[=VALUE] compile-time switches")
    p.add_argument("--variant-dir", action="append", metavar="DIR",
                   help="a directory of kernel sources (norm_common.cuh and the four .cu files) to add as a variant")
    p.add_argument("--save-sources", type=Path, metavar="DIR",
                   help="no GPU: write each --sources revision's kernel sources to DIR/<commit> (for --variant-dir "
                        "on a machine whose copy of the project has no git history) and stop")
    p.add_argument("--static", metavar="ARCH[,ARCH]",
                   help="no GPU: ptxas -v and SASS counts of each variant's kernel for the selected ops, dtype "
                        "(first of --dtypes, default bfloat16) and hidden sizes (default 4096 8192)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    try:
        args.variants = parse_sources(args.sources, args.variant_dir)
    except VariantError as exc:
        p.error(str(exc))
    if args.static:
        args.arches = [a.strip() for a in args.static.split(",") if a.strip()]
        for a in args.arches:
            try:
                build.nvcc_flags(a)
            except ValueError as exc:
                p.error(str(exc))
        if not args.variants:
            args.variants = parse_sources(["worktree"])
    elif args.variant_dir and not args.sources and len(args.variants) == 1:
        p.error("--variant-dir needs a second variant to compare with (e.g. --sources worktree)")
    return args


def no_cuda_reason() -> str | None:
    """Why torch cannot run CUDA kernels here, or None."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (no GPU, or no driver)"
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="normfuse-variants-") as workdir:
        try:
            variants = [materialise(v, Path(workdir)) for v in args.variants]
        except VariantError as exc:
            sys.exit(f"error: {exc}")
        if args.save_sources:
            save_sources(variants, args.save_sources)
            return
        if args.static:
            dtype = (args.dtypes or ["bfloat16"])[0]
            try:
                rows = static_analysis(variants, args.arches, args.ops or list(OPS), dtype,
                                       tuple(args.hidden or TARGET_HIDDEN), tune=args.tune, split=args.split)
            except VariantError as exc:
                sys.exit(f"error: {exc}")
            table = report_static(rows)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                write_text(args.out / "kernels-static.json", json.dumps(
                    {"variants": [v.describe() for v in variants], "results": rows}, indent=1))
                write_text(args.out / "kernels-static.md", table + "\n")
            print(table)
            return
        missing = no_cuda_reason()
        if missing:
            sys.exit(f"error: bench/kernels.py times the kernels on an NVIDIA GPU: {missing}; without one, "
                     "--static ARCH gives each kernel's ptxas and SASS figures")
        args.out = args.out or ROOT / "bench" / "results"
        args.out.mkdir(parents=True, exist_ok=True)
        args.partial = args.out / "partial.json"
        if variants:
            try:
                data = run_variants(args, variants)
            except VariantError as exc:
                sys.exit(f"error: {exc}")
        else:
            data = run(args)
        args.partial.unlink(missing_ok=True)
    gpu = data["device"]["name"].lower().replace("nvidia ", "").replace(" ", "-")
    if variants:
        stem = f"{gpu}-kernels-ab"
        write_text(args.out / f"{stem}.json", json.dumps(data, indent=1))
        table = report_variants(data)
        write_text(args.out / f"{stem}.md", table + "\n")
        print(table)
        return
    stem = (f"{gpu}-kernels" + ("-quick" if args.quick else "") + ("-tune" if args.tune else "")
            + ("-tactics" if args.tactics else "") + ("-split" if args.split else "")
            + ("-clean-flush" if args.flush == "clean" else ""))
    write_text(args.out / f"{stem}.json", json.dumps(data, indent=1))
    table = report(data)
    write_text(args.out / f"{stem}.md", table + "\n")
    plot(data, args.out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
