"""normfuse beside ONNX Runtime's transformers optimizer and onnxscript's ORT fusions.

    python bench/compare_peers.py [--json bench/results/peers-cpu.json] [--only NAME]

Each case is a small torch module (a residual sum followed by a norm, as in a pre-norm block),
or one of the project's own 2-layer stacks, exported by torch's dynamo or TorchScript exporter,
or a small Flax, Equinox, Paddle or Keras block as jax2onnx, jax2tf with tf2onnx, paddle2onnx or
tf2onnx writes it (committed under tests/data).
Every tool rewrites the same file:
- ONNX Runtime: `onnxruntime.transformers.optimizer.optimize_model(model_type="bert", opt_level=0)`
  (its Python fusions only; needs `sympy`, `packaging`, `coloredlogs`);
- onnxscript: `onnxscript.rewriter.ort_fusions.optimize_for_ort`;
- normfuse: `rewrite_model(target="onnxruntime")`, so that all three run on the same runtime.
Per graph and tool the table gives the norms in the output as fused ops (out of the norms the
module has), whether a fusion is wrong (outputs differ from the original's beyond the dtype's
tolerance on random inputs, both run by ONNX Runtime), the tool's crash (an exception), or an
invalid model (ONNX Runtime refuses to load what the tool wrote). `axis1` is a
near-miss: a mean over axis 1 is not a norm, so 0 is the right count there.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.files import write_text  # noqa: E402

NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization", "RMSNorm", "LayerNorm", "AddRMSNorm",
            "AddLayerNorm"}
HIDDEN, EPS = 64, 1e-6


def _modules():
    import torch
    from torch import nn

    class Block(nn.Module):
        """h = x + r; return norm(h), h (the sum is used again, as the next residual is)."""

        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x, r):
            h = x + r
            return self.norm(h), h

    class LlamaRMSNorm(nn.Module):  # HF LLaMA/Mistral: fp32 statistics, cast back, weight * x
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

        def forward(self, x):
            dtype = x.dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
            return self.weight * h.to(dtype)

    class SquareDivRMSNorm(nn.Module):  # hand-written: x * x and a division by the root
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

        def forward(self, x):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * self.weight

    class T5LayerNorm(nn.Module):  # T5: no mean, weight after the product
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

        def forward(self, x):
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(variance + EPS)
            if self.weight.dtype in (torch.float16, torch.bfloat16):
                x = x.to(self.weight.dtype)
            return self.weight * x

    class GemmaRMSNorm(nn.Module):  # Gemma: * (1 + w), in fp32
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) - 0.5)

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
            return (h * (1.0 + self.weight.float())).type_as(x)

    class AffineNorm(nn.Module):  # a LayerNorm's weight and bias, written out by the subclasses below
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)
            self.bias = nn.Parameter(torch.rand(HIDDEN) - 0.5)

    class HandLayerNorm(AffineNorm):  # hand-written LayerNorm with Sqrt + Div
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            var = (x - mean).pow(2).mean(-1, keepdim=True)
            return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias

    class VarMeanLayerNorm(AffineNorm):  # torch.var_mean: the dynamo exporter reduces with keepdims=0 and puts the axis back
        def forward(self, x):
            var, mean = torch.var_mean(x, -1, keepdim=True, unbiased=False)
            return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias

    class BatchNormArithmeticLayerNorm(AffineNorm):  # TF's batch_normalization maths (tf2onnx's Keras/BERT LayerNorm)
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            s = torch.rsqrt(((x - mean) * (x - mean)).mean(-1, keepdim=True) + 1e-3) * self.weight
            return x * s + (self.bias - mean * s)

    class HeliumRMSNorm(nn.Module):  # Helium: LLaMA's RMSNorm with eps 1e-8, which torch's optimiser drops as an Add of 0
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

        def forward(self, x):
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-8)
            return (self.weight.to(torch.float32) * h).to(x.dtype)

    class BertHandLayerNorm(AffineNorm):  # the hand-written LayerNorm of ports of Google's BERT, eps 1e-12
        def forward(self, x):
            u = x.mean(-1, keepdim=True)
            s = (x - u).pow(2).mean(-1, keepdim=True)
            return self.weight * ((x - u) / torch.sqrt(s + 1e-12)) + self.bias

    class NGPTL2Norm(nn.Module):  # nGPT (transformers' Dory): the hidden state kept at L2 norm 1, an RMSNorm in disguise
        def forward(self, x):
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + EPS)).type_as(x)

    class Axis1RMS(nn.Module):  # near-miss: statistics over axis 1, not the last axis
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + EPS))

    def rms_module():
        norm = nn.RMSNorm(HIDDEN, eps=EPS)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        return norm

    def layer_module():
        norm = nn.LayerNorm(HIDDEN)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return norm

    return {
        "llama-rms": (lambda: Block(LlamaRMSNorm()), 1),
        "x*x-div-rms": (lambda: Block(SquareDivRMSNorm()), 1),
        "t5-rms": (lambda: Block(T5LayerNorm()), 1),
        "gemma-rms": (lambda: Block(GemmaRMSNorm()), 1),
        "nn.RMSNorm": (lambda: Block(rms_module()), 1),
        "hand-layernorm": (lambda: Block(HandLayerNorm()), 1),
        "nn.LayerNorm": (lambda: Block(layer_module()), 1),
        "tf-layernorm": (lambda: Block(BatchNormArithmeticLayerNorm()), 1),
        "var_mean-layernorm": (lambda: Block(VarMeanLayerNorm()), 1),
        "helium-rms, eps 1e-8": (lambda: Block(HeliumRMSNorm()), 1),
        "bert-hand-layernorm, eps 1e-12": (lambda: Block(BertHandLayerNorm()), 1),
        "ngpt-l2 (Dory)": (lambda: Block(NGPTL2Norm()), 1),
        "axis1-rms (near-miss)": (lambda: Block(Axis1RMS()), 0),
    }


@dataclass
class Case:
    name: str
    module: str
    dtype: str
    exporter: str
    opset: int
    expected: int
    path: Path | None = None


STACKS = {  # the project's own exports: 2 pre-norm layers and a final norm (5 norms, 4 after a residual Add)
    "models rmsnorm stack": dict(norm="rmsnorm"),
    "models layernorm stack (spelled out)": dict(norm="layernorm", decomposed_layernorm=True),
}


# jax2onnx's, jax2tf's (through tf2onnx), paddle2onnx's and tf2onnx's exports of small Flax, Equinox, Paddle and Keras blocks,
# committed with the tests (JAX, PaddlePaddle and TensorFlow are not dependencies): path -> norms. The bfloat16 one is left out: ONNX
# Runtime's CPU provider has no bf16 Gemm. The Keras rms_scaling block's last LayerNorm is not a norm
# (it scales x by the centred variance), so it has 2; the jax2tf LayerNorm over the middle axis has none, nor
# has the hand-written jnp.var LayerNorm with ddof=1 (Bessel's correction).
FRAMEWORK_EXPORTS = {"jax2onnx/flax-block-float32.onnx": 3, "jax2onnx/flax-block-float32-native.onnx": 3,
                     "jax2onnx/equinox-block-float32.onnx": 2, "jax2onnx/hand-var-block-float32.onnx": 2,
                     "jax2onnx/hand-var-ddof1-block-float32.onnx": 0, "paddle2onnx/paddle-block-float32-opset13.onnx": 3,
                     "paddle2onnx/paddle-block-float32-opset17.onnx": 3, "tf2onnx/keras-block-float32.onnx": 3,
                     "tf2onnx/keras-block-rms-scaling-float32.onnx": 2, "jax2tf/flax-block-rows-float32.onnx": 3,
                     "jax2tf/flax-block-seq-float32.onnx": 3, "jax2tf/flax-middle-axis-float32.onnx": 0}
DATA_DIR = ROOT / "tests" / "data"


def cases() -> list[Case]:
    out = []
    for path, expected in FRAMEWORK_EXPORTS.items():
        exporter, name = path.split("/")
        stem = name[:-len(".onnx")]
        opset = next(o.version for o in onnx.load(str(DATA_DIR / path)).opset_import if o.domain in ("", "ai.onnx"))
        out.append(Case(f"{exporter} {stem}", stem, "float32", exporter, opset, expected, DATA_DIR / path))
    for module in STACKS:
        for dtype in ("float32", "float16"):
            for exporter in ("dynamo", "torchscript"):
                out.append(Case(f"{module} {dtype} {exporter}", module, dtype, exporter, 18, 5))
    for module, (_, expected) in _modules().items():
        for dtype in ("float32", "float16"):
            for exporter in ("dynamo", "torchscript"):
                out.append(Case(f"{module} {dtype} {exporter}", module, dtype, exporter, 18, expected))
    return out


def export_case(case: Case, directory: Path) -> Path:
    import torch

    if case.module in STACKS:
        from export.export_model import export_model
        from models import preset

        config = preset("tiny", dtype=case.dtype, **STACKS[case.module])
        path = directory / (case.name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        return export_model(config, path, exporter=case.exporter, opset=case.opset).path

    torch.manual_seed(0)
    module = _modules()[case.module][0]().to(getattr(torch, case.dtype)).eval()
    x = torch.randn(2, 8, HIDDEN, dtype=getattr(torch, case.dtype))
    r = torch.randn(2, 8, HIDDEN, dtype=getattr(torch, case.dtype))
    path = directory / (case.name.replace(" ", "_").replace("*", "x").replace("(", "").replace(")", "") + ".onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        if case.exporter == "dynamo":
            program = torch.onnx.export(module, (x, r), dynamo=True, opset_version=case.opset,
                                        input_names=["x", "r"], output_names=["y", "sum"])
            onnx.save(program.model_proto, str(path))
        else:
            torch.onnx.export(module, (x, r), str(path), dynamo=False, opset_version=case.opset,
                              input_names=["x", "r"], output_names=["y", "sum"])
        logging.disable(logging.NOTSET)
    return path


# ---- the tools -------------------------------------------------------------------------------

def run_ort_optimizer(path: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    with contextlib.redirect_stdout(io.StringIO()):
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        return optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).model


def run_onnxscript(path: Path) -> onnx.ModelProto:
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, _ = optimize_for_ort(ir.load(str(path)))
    return ir.to_proto(model)


def run_normfuse(path: Path) -> onnx.ModelProto:
    from export.rewrite import rewrite_model

    return rewrite_model(onnx.load(str(path)), target="onnxruntime")[0]


TOOLS = {"onnxruntime": run_ort_optimizer, "onnxscript": run_onnxscript, "normfuse": run_normfuse}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run what the tool wrote
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def judge(case: Case, tool: str) -> dict:
    from normops import GRAPH

    original = onnx.load(str(case.path))
    rng = np.random.default_rng(0)
    # [2, 8, HIDDEN], or its last two for a block on rows ([batch, HIDDEN])
    feeds = {i.name: (rng.standard_normal((2, 8, HIDDEN)[3 - len(i.type.tensor_type.shape.dim):]) + 0.3).astype(case.dtype)
             for i in original.graph.input}
    assert HIDDEN == 64  # the tiny preset's hidden size too
    try:
        rewritten = TOOLS[tool](case.path)
    except Exception as exc:
        return {"fused": 0, "wrong": False, "invalid": None, "crash": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}",
                "trace": traceback.format_exc(limit=3)}
    fused = sum(1 for n in rewritten.graph.node if n.op_type in NORM_OPS)
    try:
        expected, actual = _run(original, feeds), _run(rewritten, feeds)
        wrong = not all(GRAPH[case.dtype].passes(a, e) for a, e in zip(actual, expected))
        max_err = max(float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) for a, e in zip(actual, expected))
    except Exception as exc:
        return {"fused": fused, "wrong": None, "crash": None, "invalid": f"{exc.__class__.__name__}: {str(exc)[:160]}"}
    return {"fused": fused, "wrong": wrong, "max_abs_err": max_err, "crash": None, "invalid": None}


def cell(result: dict, expected: int) -> str:
    if result["crash"]:
        return "crash"
    if result["invalid"]:
        return f"{result['fused']}/{expected} invalid model"
    text = f"{result['fused']}/{expected}"
    if result["wrong"]:
        text += f" WRONG (err {result['max_abs_err']:.2g})"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every result here (e.g. bench/results/peers-cpu.json)")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args(argv)
    selected = [c for c in cases() if not args.only or args.only in c.name]
    rows = []
    with tempfile.TemporaryDirectory(prefix="normfuse-peers-") as tmp:
        for case in selected:
            try:
                case.path = case.path or export_case(case, Path(tmp))
            except Exception as exc:  # e.g. TorchScript has no export for aten::rms_norm
                print(f"{case.name:40s} not exported: {exc.__class__.__name__}", flush=True)
                continue
            results = {tool: judge(case, tool) for tool in TOOLS}
            rows.append((case, results))
            print(f"{case.name:40s} " + "  ".join(f"{t}: {cell(r, case.expected):22s}" for t, r in results.items()), flush=True)

    lines = ["| graph (exporter, dtype) | norms | " + " | ".join(TOOLS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in TOOLS) + " |"]
    for case, results in rows:
        lines.append(f"| {case.module} ({case.exporter}, {case.dtype}) | {case.expected} | "
                     + " | ".join(cell(r, case.expected) for r in results.values()) + " |")
    totals = {t: {"right": sum(1 for c, r in rows if not r[t]["crash"] and not r[t]["invalid"] and not r[t]["wrong"]
                               and r[t]["fused"] == c.expected),
                  "wrong": sum(1 for _, r in rows if r[t]["wrong"]),
                  "crash_or_invalid": sum(1 for _, r in rows if r[t]["crash"] or r[t]["invalid"])} for t in TOOLS}
    lines.append(f"| **all right / wrong / crash or invalid output** | {len(rows)} graphs | "
                 + " | ".join(f"{v['right']} / {v['wrong']} / {v['crash_or_invalid']}" for v in totals.values()) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.json:
        payload = {"cases": [{"graph": c.name, "expected_norms": c.expected,
                              **{t: {k: v for k, v in r[t].items() if k != "trace"} for t in TOOLS}} for c, r in rows],
                   "totals": totals, "table_markdown": table}
        write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
