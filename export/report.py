"""The report (stage 5): a table on the terminal, report.json, report.md and report.png."""
from __future__ import annotations

from pathlib import Path

from .bench import one_pair_caveat, pair_speedups, pair_spread, speedup
from .files import atomic_path, write_json, write_text
from .norm_check import describe as describe_norm_check
from .norm_check import describe_passed as describe_op_check
from .rewrite import describe_counts, describe_unmatched_means, describe_without_epsilon
from .validate import describe_as_written, describe_float32, fused_op_failed, result_cell, shape_label


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and, when something was timed, report.png (the latency and
    time-share charts; with nothing timed they would be empty axes). A report.png of an earlier run
    in the same folder is removed then, so no plot is left beside a report it does not belong to."""
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md"}
    write_json(paths["json"], report)
    write_text(paths["md"], markdown(report))
    png = out_dir / "report.png"
    if report["bench"]:
        plot(report, png)
        paths["png"] = png
    else:
        png.unlink(missing_ok=True)
    return paths


# how export.decode passed the KV cache from step to step
CACHE_WAYS_SAID = {"kept": "stayed with ONNX Runtime (I/O binding)", "host": "went through numpy"}
NOTHING_TIMED = "nothing was timed on this machine: every backend that could time these graphs was skipped (see Skipped)"


def _by_backend(report: dict) -> dict[str, dict[str, dict]]:
    """backend -> graph ("reference", "fused") -> its bench result; a backend may have the
    reference alone (nothing fused for it)."""
    by_backend: dict[str, dict] = {}
    for result in report.get("bench", []):
        by_backend.setdefault(result["backend"], {})[result["graph"]] = result
    return by_backend


def bench_pairs(report: dict):
    """(backend, reference result, fused result) for each backend that benchmarked both."""
    for backend, graphs in _by_backend(report).items():
        if "reference" in graphs and "fused" in graphs:
            yield backend, graphs["reference"], graphs["fused"]


def _file(result: dict) -> str:
    return Path(result.get("model", "")).name or result["graph"]


def fusion_shortfall(report: dict) -> str | None:
    """What to say when the rewrite fused fewer norms than the model has, else None: with none
    fused the two graphs are one, and their timings compare nothing."""
    rw = report["rewrite"]
    if rw["fused"] >= rw["expected_norms"]:
        return None
    if rw["fused"] == 0:
        return (f"no norm was fused ({len(rw['rejected'])} rejected): the fused graph is the reference graph, "
                "so the benchmark compares a graph with itself")
    return (f"only {rw['fused']} of the model's {rw['expected_norms']} norms were fused ({len(rw['rejected'])} rejected): "
            "the comparison covers those only")


def bench_shape(cfg: dict) -> str:
    """'1x128', or '1x1, past_sequence_length=512' where --dim sized named dimensions."""
    dims = ", ".join(f"{name}={size}" for name, size in (cfg.get("dims") or {}).items())
    return f"{cfg['batch']}x{cfg['seq']}" + (f", {dims}" if dims else "")


def markdown(report: dict) -> str:
    cfg = report["config"]
    rw = report["rewrite"]
    if cfg.get("source"):  # a given model (--onnx), not an exported stack
        described = f"Model `{cfg['source']}`; bench shape {bench_shape(cfg)}."
    else:
        described = (f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, ffn {cfg['ffn']}; "
                     f"exporter {cfg['exporter']}, opset {cfg['opset']}; bench shape {bench_shape(cfg)}.")
    what = f"`{Path(cfg['source']).name}`" if cfg.get("source") else f"{cfg['norm']} `{cfg['preset']}`"
    lines = [f"# normfuse report: {what} ({cfg['dtype']})", "", described, "",
             "## Rewrite", "",
             f"TensorRT form (`fused-tensorrt.onnx`): fused {rw['fused']} of {rw['expected_norms']} norms ({describe_counts(rw['counts'])}), "
             f"{rw['nodes_before']} -> {rw['nodes_after']} nodes, {len(rw['rejected'])} rejected.", ""]
    for target, label in (("onnxruntime", "ONNX Runtime CUDA form (`fused.onnx`)"),
                          ("onnxruntime_cpu", "ONNX Runtime CPU form (`fused-cpu.onnx`, residual Adds kept)")):
        if target in rw:
            fused = rw[target]["fused"]
            lines.append(f"- {label}: {fused} fused" + (f" ({describe_counts(rw[target]['counts'])})" if fused else ""))
    for r in rw["rejected"]:
        lines.append(f"- rejected `{r['pattern']}` at `{r['output']}`: {r['reason']}")
    unmatched = rw.get("tensorrt", {}).get("unmatched_means")
    if unmatched:
        lines.append(f"- {describe_unmatched_means(unmatched)}")
    without_epsilon = rw.get("tensorrt", {}).get("without_epsilon")
    if without_epsilon:
        lines.append(f"- {describe_without_epsilon(without_epsilon)}")
    shortfall = fusion_shortfall(report)
    if shortfall:
        lines += ["", f"**Warning:** {shortfall}."]
    lines += ["", "## Validation", "", "| reference | candidate | shape | output | max abs | max rel | tolerance | result |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pair in report["validation"]:
        for name, s in pair["outputs"].items():
            reference = pair.get("judged_against", pair["reference"])
            lines.append(f"| {reference} | {pair['candidate']} | {shape_label(pair)} | {name} | "
                         f"{s['max_abs']:.3g} | {s['max_rel']:.3g} | atol {s['atol']:g}, rtol {s['rtol']:g} | "
                         f"{result_cell(s).replace('FAIL', '**FAIL**', 1)} |")
        if fused_op_failed(pair):
            lines.append(f"| {pair['reference']} | {pair['candidate']} | {shape_label(pair)} | fused ops alone | | | "
                         "normops.OP | **FAIL** (below) |")
    for pair in report["validation"]:
        if pair.get("op_check"):
            lines += ["", f"{pair['candidate']} {shape_label(pair)}: {describe_op_check(pair['op_check'])}."]
        if pair.get("norm_check"):
            lines += ["", f"{pair['candidate']} {shape_label(pair)}: {describe_norm_check(pair['norm_check'])}."]
        if pair.get("as_written"):
            lines += ["", f"{pair['candidate']} {shape_label(pair)}: {describe_as_written(pair)}."]
        if pair.get("float32_check"):
            lines += ["", f"{pair['candidate']} {shape_label(pair)}: {describe_float32(pair)}."]
    lines += ["", "## Benchmark", ""]
    if not report["bench"]:
        lines.append(NOTHING_TIMED[0].upper() + NOTHING_TIMED[1:] + ".")
    else:
        lines += ["| backend | graph | p50 ms | p99 ms | tokens/s | peak MiB | nodes | file MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["bench"]:
        lines.append(f"| {r['backend']} | {r['graph']} | {r['latency_ms']['p50']:.3f} | {r['latency_ms']['p99']:.3f} | "
                     f"{throughput_cell(r)} | {memory_cell(r)} | {r['nodes']} | {r['file_size_mb']:.2f} |")
    if report["bench"]:
        lines += ["", bench_method(report["config"], report["bench"])]
    for backend, graphs in _by_backend(report).items():
        ref, fused = graphs.get("reference"), graphs.get("fused")
        if ref and fused and rw["fused"]:
            lines += ["", f"p50 speed-up of fused (`{_file(fused)}`) over reference on {backend}: "
                          f"**{speedup(ref, fused):.2f}x**{pair_spread(pair_speedups(ref, fused))}{one_pair_caveat(ref)}."]
        lines += ["", f"### Where the time goes ({backend}, share of FLOPs vs share of profiled node time)", "",
                  "| class | graph | FLOP share | node-time share | ms per run | nodes run per run |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, result in (("reference", ref), ("fused", fused)):
            for cls, c in ((result or {}).get("op_classes") or {}).items():
                lines.append(f"| {cls} | {label} | {c['flop_share']:.2%} | {c['time_share']:.1%} | {c['time_ms']:.3f} | {c['kernels']} |")
        lines += ["", PROFILE_CAVEAT]
    lines += decoding_markdown(report.get("decode") or [])
    lines += ["", "## Skipped", ""]
    lines += [f"- **{s['stage']}**: {s['reason']}" for s in report["skipped"]] or ["- nothing"]
    peaks = report.get("stage_peak_rss_mb") or {}
    lines += ["", "## Stage times and memory", "",
              "Peak memory: the largest resident set (RSS, MiB) of the build's process during the stage, or of a "
              "bench worker as it reports its own; absolute, where the bench table's is above a baseline.", "",
              "| stage | seconds | peak MiB |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.2f} | {peaks[k]:.0f} |" if k in peaks else f"| {k} | {v:.2f} | |"
              for k, v in report["stage_seconds"].items()]
    env = report.get("environment", {})
    lines += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def _fused_name(model: dict) -> str:
    """`fused-cpu.onnx`, or `decoder_model_merged/fused-cpu.onnx` where a folder's models each have
    their own (export.build on a folder), and both halves' where a decoder is two (`decoder_files.Halves`)."""
    def short(text: str) -> str:
        path = Path(text)
        return f"{path.parent.name}/{path.name}" if model.get("encoder") else path.name

    return " + ".join(short(part) for part in str(model["model"]).split(" + "))


def decoding_markdown(records: list[dict]) -> list[str]:
    """The report's greedy-decoding section: one row per backend."""
    if not records:
        return []
    first = records[0]
    seq2seq = any("encoder_ms" in d["models"]["reference"] for d in records)
    lines = ["", "## Greedy decoding (KV cache)", "",
             "The fused graph is fed the reference's tokens; its scores are compared against the reference "
             "run as written (ONNX Runtime's own fusions off). Each decodes "
             f"{first.get('rounds', 1)} time(s) after a warm-up, the two taking turns to go first; the step "
             f"times are pooled. Between steps the cache {CACHE_WAYS_SAID.get(first.get('cache'), 'went through numpy')}."
             + (" The fused decoder reads the fused encoder's states." if seq2seq else ""),
             "",
             "| backend | fused graph | tokens | same tokens | scores | max abs | "
             + ("encoder ms, reference -> fused | " if seq2seq else "")
             + "prefill ms, reference -> fused | step p50 ms, reference -> fused | speed-up |",
             "| --- " * (10 if seq2seq else 9) + "|"]
    for d in records:
        ref, fused, agree = d["models"]["reference"], d["models"]["compared"], d["agreement"]
        encoder = (f"{ref['encoder_ms']:.3f} -> {fused['encoder_ms']:.3f} | " if seq2seq else "")
        lines.append(f"| {d['backend']} | `{_fused_name(fused)}` | {d['new_tokens']} | "
                     f"{agree['same_tokens']}/{agree['steps']}"
                     + (f" (+{agree['near_ties']} near ties)" if agree.get("near_ties") else "") + " | "
                     f"{'within tolerance' if agree['scores_within_tolerance'] else '**out of tolerance**'} | "
                     f"{agree['max_abs']:.3g} | {encoder}{ref['prefill_ms']:.3f} -> {fused['prefill_ms']:.3f} | "
                     f"{ref['step_ms']['p50']:.3f} -> {fused['step_ms']['p50']:.3f} | "
                     f"{ref['step_ms']['p50'] / fused['step_ms']['p50']:.2f}x |")
    lines += [f"\n{d['backend']}: {d['note']}." for d in records if d.get("note")]
    return lines


# what the op-class table's times are, and are not
PROFILE_CAVEAT = ("Node times are the sums ONNX Runtime's profiler records per node, in runs of their own: they include "
                  "its per-node overhead, and on the CUDA provider they time each node's launch from the host, not the "
                  "GPU's kernels, so they add up to more than the p50 on small graphs. Read the shares as where the "
                  "graph's nodes go, and the p50 above for time.")


def memory_cell(record: dict) -> str:
    """A bench record's peak memory in MiB, or n/a where it could not be measured (a GPU's without
    torch's CUDA)."""
    value = record.get("peak_memory_mb")
    return "n/a" if value is None else f"{value:.1f}"


def throughput_cell(record: dict) -> str:
    """Tokens per second, or n/a for a model whose inputs hold no tokens (an image, a waveform)."""
    value = record.get("throughput_tokens_per_s")
    return "n/a" if value is None else f"{value:.0f}"


def bench_method(config: dict, records: list[dict]) -> str:
    """How the benchmark's figures were taken, under its table."""
    pairs = config.get("pairs", 1)
    runs = config.get("runs")
    processes = "a process of its own" if pairs == 1 else f"{pairs} processes of its own, the graphs taking turns to go first"
    where = sorted({"host" if r["backend"] == "ort-cpu" else "device" for r in records})
    memory = {"host": "on the CPU the bench worker's resident high-water mark above its RSS before the session",
              "device": "on a GPU the device memory in use after the runs above that before loading (every process "
                        "on the device)"}
    return (f"Each graph was timed in {processes}: {runs} runs after {config.get('warmup')} untimed ones"
            + (f", {pairs * runs} in all" if pairs > 1 else "") + ". p50 and p99 are over all those runs, "
            "interpolating linearly between them (of 100 runs the p99 lies between the two slowest, so it is a tail "
            "figure only with many more); tokens/s is the first input's batch x sequence at the p50 (n/a where it "
            "holds no tokens: an image, a waveform, a spectrogram; the JSON has samples per second). Peak MiB: "
            + "; ".join(memory[w] for w in where) + (", the median over the pairs" if pairs > 1 else "") + ".")


def latency_title(by_backend: dict) -> str:
    """The latency panel's title: what it compares, or that only the reference was timed (the
    fused graph's bench skipped, with the reason in the report)."""
    if any("fused" in graphs for graphs in by_backend.values()):
        return "Latency, reference vs fused"
    return "Latency of the reference (the fused graph was not timed: see Skipped)"


def plot_title(cfg: dict) -> str:
    """The exported stack by norm and preset; a given model by its file (a folder's models are all
    `model` by kind, and often `model.onnx` by name)."""
    what = (f"{Path(cfg['source']).name}" if cfg.get("source") else f"{cfg['norm']} {cfg['preset']}")
    return f"normfuse: {what} {cfg['dtype']}, {bench_shape(cfg)}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_backend = _by_backend(report)
    decoding = report.get("decode") or []
    fig, axes = plt.subplots(1, 3 if decoding else 2, figsize=(16.5 if decoding else 11, 4))
    ax = axes[0]
    labels = list(by_backend)
    for offset, key in ((-0.2, "reference"), (0.2, "fused")):
        present = [(x, graphs[key]) for x, graphs in enumerate(by_backend.values()) if key in graphs]
        if not present:
            continue
        p50 = [r["latency_ms"]["p50"] for _, r in present]
        p99 = [r["latency_ms"]["p99"] for _, r in present]
        both = [len({"reference", "fused"} & set(graphs)) == 2 for graphs in by_backend.values()]
        xs = [x + (offset if both[x] else 0.0) for x, _ in present]  # a lone bar stands on its tick
        bars = ax.bar(xs, p50, width=0.4, label=f"{key} p50")
        ax.errorbar(xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]], fmt="none", ecolor="black", capsize=4)
        ax.bar_label(bars, fmt="%.2f", label_type="center")  # inside the bar: the p99 whisker rises from its top
    ax.set_xticks(range(len(labels)), labels)
    cfg = report["config"]
    runs = cfg.get("runs", 0) * cfg.get("pairs", 1)
    ax.set_ylabel(f"latency (ms), whisker to p99 of {runs} runs" if runs else "latency (ms), whisker to p99")
    ax.set_title(latency_title(by_backend))
    ax.legend()

    ax = axes[1]
    rows = [(f"{label}\n{b}", graphs[key]) for b, graphs in by_backend.items()
            for label, key in (("ref", "reference"), ("fused", "fused")) if key in graphs]
    bottoms = [0.0] * len(rows)
    for cls, colour in (("matmul", "#4c72b0"), ("norm", "#dd8452"), ("elementwise", "#55a868")):
        values = [((res.get("op_classes") or {}).get(cls) or {}).get("time_ms", 0.0) for _, res in rows]
        ax.bar(range(len(rows)), values, bottom=bottoms, color=colour, label=cls)
        bottoms = [a + b for a, b in zip(bottoms, values)]
    ax.set_xticks(range(len(rows)), [name for name, _ in rows])
    ax.set_ylabel("node time per run (ms, ONNX Runtime's profiler)")
    ax.set_title("Where the time goes")
    ax.legend()
    if decoding:
        from .decode_report import plot_steps

        for record in decoding:
            plot_steps(axes[2], record, prefix=f"{record['backend']} " if len(decoding) > 1 else "")
    fig.suptitle(plot_title(report["config"]))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    rw = report["rewrite"]
    console.print(f"[bold]rewrite[/] (TensorRT form): fused {rw['fused']}/{rw['expected_norms']} norms "
                  f"({describe_counts(rw['counts'])}), {rw['nodes_before']} -> {rw['nodes_after']} nodes, "
                  f"{len(rw['rejected'])} rejected")
    table = Table(title="validation (per output, against the dtype's graph tolerance)")
    for col in ("reference", "candidate", "shape", "output", "max abs", "max rel", "result"):
        table.add_column(col)
    for pair in report["validation"]:
        for name, s in pair["outputs"].items():
            table.add_row(pair.get("judged_against", pair["reference"]), pair["candidate"], shape_label(pair), name,
                          f"{s['max_abs']:.3g}", f"{s['max_rel']:.3g}",
                          ("[green]" if s["passed"] else "[red]") + result_cell(s))
        if fused_op_failed(pair):
            table.add_row(pair["reference"], pair["candidate"], shape_label(pair), "fused ops alone", "", "",
                          "[red]FAIL (below)")
    console.print(table)
    for pair in report["validation"]:
        if pair.get("op_check"):
            console.print(f"[dim]{pair['candidate']} {shape_label(pair)}: {describe_op_check(pair['op_check'])}[/]")
        if pair.get("norm_check"):
            colour = "yellow" if pair["norm_check"]["passed"] else "red"
            console.print(f"[{colour}]{pair['candidate']} {shape_label(pair)}[/]: {describe_norm_check(pair['norm_check'])}")
        if pair.get("as_written"):
            console.print(f"[yellow]{pair['candidate']} {shape_label(pair)}[/]: {describe_as_written(pair)}")
        if pair.get("float32_check"):
            colour = "yellow" if pair["passed"] else "red"
            console.print(f"[{colour}]{pair['candidate']} {shape_label(pair)}[/]: {describe_float32(pair)}")
    if report["bench"]:
        cfg = report["config"]
        table = Table(title=f"benchmark (each graph in its own process; {cfg.get('runs')} runs"
                            + (f" x {cfg['pairs']} pairs" if cfg.get("pairs", 1) > 1 else "") + ")")
        for col in ("backend", "graph", "p50 ms", "p99 ms", "tokens/s", "peak MiB", "nodes", "norm node time", "norm FLOPs"):
            table.add_column(col, justify="right")
        for r in report["bench"]:
            norm = (r.get("op_classes") or {}).get("norm") or {}
            table.add_row(r["backend"], r["graph"], f"{r['latency_ms']['p50']:.3f}", f"{r['latency_ms']['p99']:.3f}",
                          throughput_cell(r), memory_cell(r), str(r["nodes"]),
                          f"{norm.get('time_share', 0):.1%}", f"{norm.get('flop_share', 0):.2%}")
        console.print(table)
    else:
        console.print(f"[bold yellow]benchmark[/]: {NOTHING_TIMED}")
    shortfall = fusion_shortfall(report)
    if shortfall:
        console.print(f"[bold red]warning[/]: {shortfall}")
    for backend, ref, fused in bench_pairs(report) if report["rewrite"]["fused"] else ():
        console.print(f"[bold]{backend}[/]: fused ({_file(fused)}) p50 is {speedup(ref, fused):.2f}x "
                      f"the reference's speed{pair_spread(pair_speedups(ref, fused))}{one_pair_caveat(ref)}; "
                      f"peak memory {memory_cell(ref)} -> {memory_cell(fused)} MiB")
    print_decoding(report.get("decode") or [], console)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in report["stage_seconds"].items())
    console.print(f"[bold]stage times[/]: {times}")
    peaks = report.get("stage_peak_rss_mb") or {}
    if peaks:
        console.print("[bold]stage peak memory[/] (resident, of the build's process or a bench worker): "
                      + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))
    for s in report["skipped"]:
        console.print(f"[yellow]skipped[/] {s['stage']}: {s['reason']}")


def print_decoding(records: list[dict], console) -> None:
    """A line per backend that greedy-decoded: tokens agreeing, scores' verdict, step times."""
    for d in records:
        ref, fused, agree = d["models"]["reference"], d["models"]["compared"], d["agreement"]
        verdict = "within tolerance" if agree["scores_within_tolerance"] else "[red]out of tolerance[/]"
        ties = f" (+{agree['near_ties']} near ties)" if agree.get("near_ties") else ""
        encoder = (f"; encoder {ref['encoder_ms']:.3f} -> {fused['encoder_ms']:.3f} ms" if "encoder_ms" in ref else "")
        console.print(f"[bold]decode on {d['backend']}[/]: {agree['same_tokens']}/{agree['steps']} same tokens{ties}, scores "
                      f"{verdict}; step p50 {ref['step_ms']['p50']:.3f} -> {fused['step_ms']['p50']:.3f} ms "
                      f"({ref['step_ms']['p50'] / fused['step_ms']['p50']:.2f}x){encoder}")
        if d.get("note"):
            console.print(f"    {d['note']}")
