"""Kernel source versions timed side by side (A/B) on a GPU: each version's kernel launched with the
current launch table (with --tune and --split, also with the layouts those time), the versions of
a cell in alternation (one launch of each per round, the order rotating), the outputs compared
with the first version's; and the table of the results.

    python bench/kernels.py --quick --sources HEAD,59deae0^ --out DIR

bench/kernels.py writes <out>/<gpu>-kernels-ab.{json,md} from run_variants and report_variants.
Needs torch with CUDA, CuPy and nvcc.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernel_grid import EPS, SPLIT_MAX_TOKENS, candidate_layouts, moved_bytes, shapes  # noqa: E402
from kernel_sources import SourceVariant, variant_ptx  # noqa: E402
from kernel_timing import SameSizeCopy, Timer, device_info, reference_timings, summarise, tensors  # noqa: E402
from export.files import write_text  # noqa: E402
from normops import OPS  # noqa: E402
from plugins import build, config, launcher  # noqa: E402


class VariantLaunch(launcher.Launch):
    """launcher.Launch for a variant's PTX: the same launch shape, arguments and launch call."""

    def __init__(self, variant: SourceVariant, op: str, x_dtype: str, gamma_dtype: str, rows: int, hidden: int,
                 layout: tuple[int, ...] | None = None, arch: str | None = None):
        self.spec = OPS[op]
        self.cfg = config.launch_config(op, x_dtype, rows, hidden, layout=layout)
        self.ptx = variant_ptx(variant, op, x_dtype, gamma_dtype, self.cfg, arch or build.target_arch())
        self.function = launcher._function(self.ptx, self.cfg.kernel)
        self.rows, self.hidden = rows, hidden


def run_variants(args, variants: list[SourceVariant]) -> dict:
    """Time each variant's kernel on every selected cell, all variants of a cell in alternation."""
    timer = Timer(args.flush)
    info = device_info()
    print("device:", info, flush=True)
    refs = reference_timings(timer)
    arch = build.target_arch()
    tokens_list, hidden_list, dtypes = shapes(args)
    same_size = SameSizeCopy(timer, args.budget)
    rows = []
    labels = [v.label for v in variants]
    for dtype in dtypes:
        for op in args.ops or OPS:
            spec = OPS[op]
            for hidden in hidden_list:
                for tokens in tokens_list:
                    x, res, gamma, beta = tensors(op, dtype, tokens, hidden)
                    nbytes = moved_bytes(op, dtype, tokens, hidden)
                    copy_here = same_size(nbytes)
                    layouts = [None]
                    if args.tune and tokens >= 4096:
                        layouts += candidate_layouts(dtype, hidden)
                    if args.split and tokens <= SPLIT_MAX_TOKENS and config.supports_split(arch):
                        layouts += config.split_layouts(dtype, hidden)  # e.g. the split-row exchange's A/B
                    in_ptrs = [t.data_ptr() for t in (x, res, gamma, beta) if t is not None]
                    stream = torch.cuda.current_stream().cuda_stream
                    for layout in layouts:
                        launches, outs = [], []
                        for v in variants:
                            launch = VariantLaunch(v, op, dtype, launcher.dtype_name(gamma), tokens, hidden,
                                                   layout=layout, arch=arch)
                            o = [torch.full_like(x, float("nan")) for _ in spec.outputs]
                            out_ptrs = [t.data_ptr() for t in o]
                            launches.append(lambda launch=launch, out_ptrs=out_ptrs: launch(in_ptrs, out_ptrs, EPS, stream))
                            outs.append(o)
                        cfg = launch.cfg
                        for fn in launches:  # outputs for the comparison, before any timing
                            fn()
                        torch.cuda.synchronize()
                        # largest |difference| from the first variant's outputs (inf where either is NaN)
                        diffs = [max(float((a - b).abs().nan_to_num(float("inf")).max().float()) if a.numel() else 0.0
                                     for a, b in zip(o, outs[0])) for o in outs]
                        modes = [("", True)] + ([("_l2_warm", False)] if tokens <= 32 else [])
                        for suffix, flush in modes:
                            times = timer.times_us_interleaved(launches, budget_s=args.budget, flush=flush)
                            for v, t, diff in zip(variants, times, diffs):
                                med = summarise(t)
                                ratios = [a / b for a, b in zip(t, times[0])]
                                rows.append({"op": op, "dtype": dtype, "tokens": tokens, "hidden": hidden,
                                             "impl": f"normfuse{suffix}", "variant": v.label, "kernel": cfg.kernel,
                                             "layout": [cfg.threads_per_row, cfg.slots, cfg.rows_per_group]
                                             + ([cfg.ctas_per_row] if cfg.ctas_per_row > 1 else []), "bytes": nbytes,
                                             "median_us": med, "same_size_copy_tbps": copy_here,
                                             "tbps": nbytes / (med * 1e-6) / 1e12,
                                             "ratio_to_first": statistics.median(ratios),
                                             "max_abs_diff_vs_first": diff,
                                             "times_us": [round(u, 3) for u in t]})
                            cell = rows[-len(variants):]
                            print(f"{op:12s} {dtype:8s} {tokens:6d}x{hidden:<6d} {cfg.kernel}{suffix} "
                                  + " ".join(f"{r['variant']}={r['median_us']:.2f}us/{r['tbps']:.2f}TB/s"
                                             f"(x{r['ratio_to_first']:.3f})" for r in cell), flush=True)
                        del launches, outs
                    del x, res, gamma, beta
                torch.cuda.empty_cache()
            if args.partial:
                write_text(args.partial, json.dumps({"device": info, "variants": [v.describe() for v in variants],
                                                     "results": rows}))  # whole, if killed next
    return {"device": info, "arch": arch, "variants": [v.describe() for v in variants], "labels": labels,
            "flush": args.flush,
            "timing": f"CUDA events around one launch after a 256 MB L2 flush ({args.flush}; _l2_warm: after a "
                      "sleep kernel); variants of a cell in alternation, order rotating each round; median",
            **refs, "results": rows}


def report_variants(data: dict) -> str:
    labels = data["labels"]
    first = labels[0]
    lines = [f"copy bandwidth {data['copy']['tbps']:.2f} TB/s; empty launch {data['empty_launch']['median_us']:.2f} us "
             f"({data['empty_launch_l2_warm']['median_us']:.2f} us with L2 warm); ratio: median over rounds of "
             f"time / time of {first} (below 1 is faster)",
             "| op | dtype | tokens x hidden | kernel | mode | " + " | ".join(f"{v} us (TB/s, % same-size copy)"
                                                                      for v in labels)
             + " | " + " | ".join(f"{v} ratio" for v in labels[1:]) + " | max diff |",
             "|---|---|---|---|---|" + "---|" * (2 * len(labels))]
    cells: dict = {}
    for r in data["results"]:
        cells.setdefault((r["op"], r["dtype"], r["tokens"], r["hidden"], r["kernel"], r["impl"]), {})[r["variant"]] = r
    for (op, dtype, tokens, hidden, kernel, impl), by in cells.items():
        mode = "L2 warm" if impl.endswith("_l2_warm") else "L2 flushed"
        cols = [f"{by[v]['median_us']:.2f} ({by[v]['tbps']:.2f}, {100 * by[v]['tbps'] / by[v]['same_size_copy_tbps']:.0f}%)"
                if v in by else "-" for v in labels]
        ratios = [f"{by[v]['ratio_to_first']:.3f}" if v in by else "-" for v in labels[1:]]
        diff = max(by[v]["max_abs_diff_vs_first"] for v in by)
        lines.append(f"| {op} | {dtype} | {tokens}x{hidden} | {kernel} | {mode} | " + " | ".join(cols + ratios)
                     + f" | {diff:.3g} |")
    return "\n".join(lines)
