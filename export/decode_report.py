"""What export.decode found, as people read it: the terminal table (timings, the tokens, the
comparison's verdict) and the plot of each decode step's time."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .decode import decoded_alike


def print_table(record: dict, console) -> None:
    from rich.table import Table

    lengths = sorted({len(p) for p in record["prompt"]})
    prompt = f"prompt {lengths[0]}" if len(lengths) == 1 else "prompts " + "/".join(str(len(p)) for p in record["prompt"])
    seq2seq = "start_token" in record
    if seq2seq:
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in record["encoder_inputs"].items())
        prompt = f"encoder {shapes}, start token {record['start_token']}"
    dtypes = record.get("dtypes") or [record["dtype"]]
    judged = (f"{' against '.join(dtypes)}: {record['dtype']}'s tolerance" if len(set(dtypes)) > 1
              else record["dtype"])
    table = Table(title=f"greedy decoding: {prompt}, {record['new_tokens']} tokens, "
                        f"batch {record['batch']} ({judged})")
    for column in ("model", *(("encoder ms",) if seq2seq else ()), "prefill ms", "step p50 ms", "step p99 ms", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, run in record["models"].items():
        rate = run["decode_tokens_per_s"]
        table.add_row(f"{label}: {Path(run['model']).name}", *((f"{run['encoder_ms']:.3f}",) if seq2seq else ()), f"{run['prefill_ms']:.3f}",
                      f"{run['step_ms']['p50']:.3f}", f"{run['step_ms']['p99']:.3f}", f"{rate:.0f}" if rate else "-")
    console.print(table)
    if seq2seq:
        console.print("encoders: " + ", ".join(f"{label} {run['encoder']}" for label, run in record["models"].items()))
    first = record["models"]["reference"]["tokens"]
    console.print("tokens: " + " ".join(str(step[0]) for step in first) + (" (first sequence)" if record["batch"] > 1 else ""))
    agree = record.get("agreement")
    if agree:
        verdict = "[green]same[/]" if decoded_alike(agree) else "[red]differs[/]"
        ties = f" ({agree['near_ties']} more in near ties)" if agree["near_ties"] else ""
        console.print(f"compared: {verdict}: the same tokens at {agree['same_tokens']}/{agree['steps']} steps{ties}; "
                      f"scores max abs {agree['max_abs']:.3g}, max rel {agree['max_rel']:.3g}, "
                      + ("all within tolerance" if agree["scores_within_tolerance"]
                         else f"out of tolerance from step {agree['first_step_out_of_tolerance']}"))
        ref, cand = (record["models"][k]["step_ms"]["p50"] for k in ("reference", "compared"))
        console.print(f"decode step p50: compared is {ref / cand:.2f}x the reference's speed")


def step_curves(record: dict) -> dict[str, list[float]]:
    """label -> decode-step time (ms) at each step, the median over the timed rounds: a step's cost
    grows with the cache it attends over."""
    return {label: [float(np.median(column)) for column in zip(*run["raw_step_ms"])]
            for label, run in record["models"].items()}


def plot_steps(ax, record: dict, prefix: str = "") -> None:
    """Decode-step time against the step on `ax` (matplotlib), one line per model. The scale stops
    at 2.5x the slowest p50, so one step the machine stalled does not flatten the rest; the title
    counts the steps above it."""
    curves = step_curves(record)
    top = 2.5 * max(run["step_ms"]["p50"] for run in record["models"].values())
    for label, times in curves.items():
        ax.plot(range(1, len(times) + 1), times, marker=".", label=f"{prefix}{label}: {Path(record['models'][label]['model']).name}")
    off = sum(t > top for times in curves.values() for t in times)
    ax.set_xlabel("decode step (after the start token)" if "start_token" in record
                  else f"decode step (after a {max(len(p) for p in record['prompt'])}-token prompt)")
    ax.set_ylabel("step time (ms), median over rounds")
    ax.set_title(f"Greedy decoding, batch {record['batch']}" + (f" ({off} step(s) above the scale)" if off else ""))
    ax.set_ylim(0, top)
    ax.legend(fontsize="small")


def write_plot(record: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    plot_steps(ax, record)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
