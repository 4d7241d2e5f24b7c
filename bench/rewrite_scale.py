"""Rewrite a LLaMA-7B-shaped graph whose 13 GB of fp16 weights are external data.

    python bench/rewrite_scale.py [--layers 32] [--hidden 4096] [--ffn 11008] [--target tensorrt]
                                  [--peers] [--json bench/results/rewrite-scale.json]

The graph is generated directly with onnx.helper: per layer a pre-attention RMSNorm, a stand-in
attention (q, k, v, o projections), a residual Add, a pre-MLP RMSNorm, a SwiGLU MLP and a second
residual Add; then a final RMSNorm. Every weight is an initializer in one external data file, which
is created sparse (its size is set, no byte is written), so generating 13 GB costs nothing and the
rewriter reading a single weight byte would show in its time and memory. The rewrite runs as the
command line (its main(), in a fresh child process), timed from outside; its peak RSS is the
child's own high-water mark (VmHWM), read by the child before it exits.
Targets: <= 5 s, <= 300 MB peak RSS, 2 * layers + 1 norms and 2 * layers residual Adds fused (none with
--target onnx, which has no fused residual form).
With --peers, ONNX Runtime's transformers optimizer and onnxscript's ORT fusions run on the same
file, each in a child stopped when its resident memory passes --peer-memory-gb.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.files import write_text  # noqa: E402
from export.rewrite.synth import NormSpec, _Builder, norm_subgraph  # noqa: E402

DATA_NAME = "weights.bin"


class ExternalWeights:
    """Initializers laid out one after another in a single (sparse) external data file."""

    def __init__(self):
        self.tensors, self.offset = [], 0

    def add(self, name: str, dims: list[int]) -> str:
        length = 2 * int(_volume(dims))  # fp16
        proto = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", DATA_NAME), ("offset", str(self.offset)), ("length", str(length))):
            proto.external_data.add(key=key, value=value)
        self.tensors.append(proto)
        self.offset += (length + 4095) // 4096 * 4096
        return name

    def write_sparse(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(self.offset)


def _volume(dims):
    out = 1
    for d in dims:
        out *= d
    return out


def build_llama_graph(directory: Path, layers: int, hidden: int, ffn: int) -> Path:
    b, w = _Builder(), ExternalWeights()
    spec = NormSpec(kind="rms", dtype="float16", casts="llama", square="pow", inverse="sqrt_reciprocal",
                    scale="left", epsilon=1e-6, hidden=hidden)
    h = "hidden_states"

    def linear(t, name, n_in, n_out):
        return b.op("MatMul", t, w.add(name, [n_in, n_out]))

    for i in range(layers):
        n1, _ = norm_subgraph(b, spec, h, 3, {"gamma": w.add(f"layers.{i}.input_layernorm.weight", [hidden])})
        q = linear(n1, f"layers.{i}.q_proj", hidden, hidden)
        k = linear(n1, f"layers.{i}.k_proj", hidden, hidden)
        v = linear(n1, f"layers.{i}.v_proj", hidden, hidden)
        mixed = b.op("Add", b.op("Mul", q, b.op("Sigmoid", k)), v)  # a stand-in for attention
        h = b.op("Add", h, linear(mixed, f"layers.{i}.o_proj", hidden, hidden))
        n2, _ = norm_subgraph(b, spec, h, 3, {"gamma": w.add(f"layers.{i}.post_attention_layernorm.weight", [hidden])})
        gate = linear(n2, f"layers.{i}.gate_proj", hidden, ffn)
        up = linear(n2, f"layers.{i}.up_proj", hidden, ffn)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
        h = b.op("Add", h, linear(act, f"layers.{i}.down_proj", ffn, hidden))
    out, _ = norm_subgraph(b, spec, h, 3, {"gamma": w.add("norm.weight", [hidden])})

    graph = helper.make_graph(
        b.nodes, "llama-shaped",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT16, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT16, ["batch", "seq", hidden])],
        initializer=b.inits + w.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path = directory / "llama.onnx"
    onnx.save_model(model, str(path))
    w.write_sparse(directory / DATA_NAME)
    return path


def _measured(cmd: list[str], log: Path) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in MB, output) of the command line in a child of its own.

    The child runs the command line's main() and then reads its own VmHWM: rusage's maxrss would
    also count the pages of the (possibly large) parent it was forked from."""
    hwm = log.with_suffix(".hwm")
    wrapped = [sys.executable, __file__, "--measured-rewrite", str(hwm)] + cmd[3:]  # drop python -m export.rewrite
    with open(log, "w") as out:
        started = time.perf_counter()
        code = subprocess.run(wrapped, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
    peak = float(hwm.read_text()) if hwm.exists() else float("nan")
    return code, wall, peak, log.read_text()


def _measured_rewrite(hwm_file: str, args: list[str]) -> int:
    from export.rewrite.__main__ import main as rewrite_cli

    code = rewrite_cli(args)
    Path(hwm_file).write_text(str(_status_kb("VmHWM") / 1024))
    return code


def _status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_peer(tool: str, src: Path, dst: Path) -> None:
    """Child process: one peer tool on the scale graph; prints the norms it fused as JSON."""
    norm_ops = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
                "SkipLayerNormalization", "RMSNormalization"}
    if tool == "onnxruntime":
        from onnxruntime.transformers.optimizer import optimize_model

        model = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).model
    else:
        from onnxscript import ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model = ir.to_proto(optimize_for_ort(ir.load(str(src)))[0])
    fused = sum(1 for n in model.graph.node if n.op_type in norm_ops)
    print(json.dumps({"norms_fused": fused}))


def peer_figures(src: Path, tmp: Path, memory_gb: float, timeout: int) -> dict:
    """Each peer in a child that is stopped when its resident memory passes `memory_gb` (polled;
    an address-space limit would also count the weight file's memory mappings) or after `timeout` s."""
    out = {}
    for tool in ("onnxruntime", "onnxscript"):
        cmd = [sys.executable, __file__, "--run-peer", tool, str(src), str(tmp / f"{tool}.onnx")]
        started, peak, status = time.perf_counter(), 0, None
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while child.poll() is None:
            peak = max(peak, _rss_bytes(child.pid))
            if peak > memory_gb * (1 << 30):
                status = f"stopped at {memory_gb:g} GB resident (it reads the weights)"
            elif time.perf_counter() - started > timeout:
                status = f"no result in {timeout} s"
            if status:
                child.kill()
                break
            time.sleep(0.05)
        stdout, stderr = child.communicate()
        fused = None
        if status is None and child.returncode == 0:
            status, fused = "ok", json.loads(stdout.strip().splitlines()[-1])["norms_fused"]
        elif status is None:
            status = (stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1][:160]
        out[tool] = {"status": status, "norms_fused": fused, "seconds": round(time.perf_counter() - started, 1),
                     "peak_rss_mb": round(peak / 2**20, 1), "memory_cap_gb": memory_gb}
    return out


def _rss_bytes(pid: int) -> int:
    try:
        return _status_kb("VmRSS", str(pid)) * 1024
    except OSError:
        return 0


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--run-peer":
        run_peer(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--measured-rewrite":
        return _measured_rewrite(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--target", default="tensorrt")
    parser.add_argument("--json", help="write the figures here (e.g. bench/results/rewrite-scale.json)")
    parser.add_argument("--peers", action="store_true",
                        help="also run ONNX Runtime's optimizer and onnxscript's fusions on the graph, each stopped "
                             "past --peer-memory-gb of resident memory")
    parser.add_argument("--peer-memory-gb", type=float, default=8.0)
    parser.add_argument("--peer-timeout", type=int, default=300)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="normfuse-scale-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        src = build_llama_graph(tmp, args.layers, args.hidden, args.ffn)
        generated = time.perf_counter() - started
        weights_bytes = (tmp / DATA_NAME).stat().st_size
        # the output beside the input shares its 13 GB weight file (elsewhere it would get a copy)
        dst, report_path = tmp / "llama.fused.onnx", tmp / "report.json"
        before = {p.name for p in tmp.iterdir()}
        cmd = [sys.executable, "-m", "export.rewrite", str(src), "-o", str(dst), "--target", args.target,
               "--report", str(report_path)]
        returncode, wall, peak_mb, output = _measured(cmd, tmp / "log.txt")
        if returncode != 0:
            print(output)
            return returncode
        report = json.loads(report_path.read_text())
        fused = onnx.load(str(dst), load_external_data=False)
        locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
        ours = {dst.name, report_path.name}  # and the harness's log.* files
        new_files = sorted(p.name for p in tmp.iterdir()
                           if p.name not in before | ours and not p.name.startswith("log."))
        peers = peer_figures(src, tmp, args.peer_memory_gb, args.peer_timeout) if args.peers else None

    norms = sum(1 for f in report["fusions"])
    residuals = sum(1 for f in report["fusions"] if f["residual"])
    figures = {
        "graph": f"{args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, fp16, weights external",
        "weights_gb": round(weights_bytes / 1e9, 2),
        "nodes_before": report["nodes_before"], "nodes_after": report["nodes_after"],
        "norms_fused": norms, "residual_adds_fused": residuals,
        "rejected": len(report["rejected"]),
        "seconds_command": round(wall, 2), "seconds_rewrite": report["seconds"],
        "peak_rss_mb": round(peak_mb, 1),
        "output_weight_locations": sorted(locations), "files_written_beside_output": new_files,
        "generate_seconds": round(generated, 2),
        "target": args.target, "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    adds = 0 if args.target == "onnx" else 2 * args.layers  # standard ONNX has no fused residual form
    goals = {"seconds <= 5": wall <= 5, "peak RSS <= 300 MB": peak_mb <= 300,
             f"{2 * args.layers + 1} norms": norms == 2 * args.layers + 1,
             f"{adds} residual Adds": residuals == adds,
             "weights shared, not copied": not new_files}
    figures["goals"] = goals
    if peers:
        figures["peers"] = peers
    print(json.dumps(figures, indent=2))
    if args.json:
        write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
