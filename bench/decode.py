"""Greedy decoding with a KV-cache decoder (LLaMA by default), reference graph against fused graph.

    python bench/decode.py [--arch llama|qwen3|gemma|gpt2] [--hidden 512 --layers 4 --ffn 1376 --vocab 8000]
                           [--tokens 64] [--repeats 3]
                           [--rounds 3] [--providers CPUExecutionProvider] [--json bench/results/decode-cpu.json]

A randomly initialised transformers decoder (LLaMA unless --arch) with its cache is exported the way optimum names it
(models/hf_decoder.py), rewritten for ONNX Runtime (the CPU form, residual Adds kept, unless
--providers starts with CUDA), and both graphs decode the same prompt with export.decode: the fused
one fed the reference's tokens, so every step is compared. Each repeat is a fresh process: a
warm-up generation of each, then --rounds timed generations of each, the two taking turns to go
first; the JSON keeps every step time of every repeat, the device and the versions. The figure of
merit is the decode step's p50, fused against reference, per repeat.

A second measurement times the reference decoder's steps with its cache kept by ONNX Runtime
between steps (I/O binding, what export.decode does on the CUDA provider) against the cache going
through numpy (`model.run`, what it does on the CPU), taking turns in one process.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers imports: run with the project
# root on the path instead of this script's folder
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from export.files import write_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=("llama", "qwen3", "gemma", "gpt2"))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--providers", default="CPUExecutionProvider")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "decode-cpu.json"))
    args = parser.parse_args()

    import onnxruntime
    import torch
    import transformers

    from export.rewrite import rewrite_file
    from models.hf_decoder import export_hf_decoder

    with tempfile.TemporaryDirectory() as tmp:
        reference, fused = Path(tmp) / "decoder.onnx", Path(tmp) / "decoder-fused.onnx"
        print(f"exporting a {args.layers}-layer {args.arch} decoder, hidden {args.hidden}, vocab {args.vocab} ...", flush=True)
        export_hf_decoder(reference, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                          ffn=args.ffn, vocab=args.vocab, positions=max(128, args.prompt + args.tokens), arch=args.arch)
        cpu = args.providers.startswith("CPU")
        report = rewrite_file(reference, fused, target="onnxruntime", residual=not cpu)
        print(f"fused {report.fused} norms ({report.counts}); {report.nodes_before} -> {report.nodes_after} nodes", flush=True)
        repeats = []
        for repeat in range(args.repeats):
            out = Path(tmp) / f"decode-{repeat}.json"
            done = subprocess.run([sys.executable, "-m", "export.decode", str(reference), "--compare", str(fused),
                                   "--prompt", str(args.prompt), "--tokens", str(args.tokens), "--seed", str(repeat),
                                   "--rounds", str(args.rounds), "--providers", args.providers, "--json", str(out)],
                                  cwd=ROOT)
            if not out.is_file():
                return done.returncode or 1
            record = json.loads(out.read_text())
            ref, cand = (record["models"][k]["step_ms"]["p50"] for k in ("reference", "compared"))
            record["step_p50_speedup"] = ref / cand
            repeats.append(record)
            print(f"repeat {repeat}: decode step p50 {ref:.3f} ms -> {cand:.3f} ms ({ref / cand:.2f}x); "
                  f"{record['agreement']['same_tokens']}/{record['agreement']['steps']} same tokens", flush=True)
        cache = cache_kept_against_copied(reference, args)
        print(f"cache kept by ONNX Runtime: step p50 {cache['kept_step_p50_ms']:.3f} ms; through numpy: "
              f"{cache['numpy_step_p50_ms']:.3f} ms (kept takes {cache['kept_over_numpy']:.2f}x the time)", flush=True)

    speedups = sorted(r["step_p50_speedup"] for r in repeats)
    result = {
        "what": "greedy decoding, reference vs fused decoder (fused fed the reference's tokens)",
        "device": platform.processor() or platform.machine(), "cpus": _cpu_count(),
        "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "config": vars(args), "fused_norms": report.fused, "nodes": [report.nodes_before, report.nodes_after],
        "step_p50_speedup_median": speedups[len(speedups) // 2], "step_p50_speedups": speedups,
        "repeats": repeats, "cache_kept_against_copied": cache,
    }
    write_text(args.json, json.dumps(result, indent=1) + "\n")
    print(f"median decode-step speed-up {result['step_p50_speedup_median']:.2f}x "
          f"(range {speedups[0]:.2f}-{speedups[-1]:.2f}x); wrote {args.json}")
    return 0


def cache_kept_against_copied(model_path: Path, args) -> dict:
    """Decode steps of one model, its cache kept by ONNX Runtime or passed through numpy, taking
    turns over 2 x --rounds generations after one warm-up each; step times pooled per way."""
    import numpy as np

    from export.decode import decoder_of, generate
    from export.runtime import load

    model = load(model_path, providers=args.providers.split(","))
    decoder = decoder_of(model, str(model_path))
    prompt = np.random.default_rng(0).integers(0, args.vocab, size=(1, args.prompt))
    steps: dict[bool, list[float]] = {False: [], True: []}
    for host in (False, True):
        generate(model, decoder, prompt, args.tokens, cache_way="host" if host else "kept")
    for round_ in range(2 * args.rounds):
        for host in ((False, True) if round_ % 2 == 0 else (True, False)):
            steps[host] += generate(model, decoder, prompt, args.tokens, cache_way="host" if host else "kept").step_ms
    kept, copied = (float(np.median(steps[host])) for host in (False, True))
    return {"kept_step_p50_ms": kept, "numpy_step_p50_ms": copied, "kept_over_numpy": kept / copied,
            "raw_step_ms": {"kept": steps[False], "numpy": steps[True]}}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
