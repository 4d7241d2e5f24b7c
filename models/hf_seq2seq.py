"""A randomly initialised T5 or BART (transformers' modelling code, nothing downloaded) exported as
Optimum lays an encoder-decoder out: `encoder_model.onnx` (input_ids, attention_mask in;
last_hidden_state out) and `decoder_model_merged.onnx`, the decoder without and with its cache in
the two branches of one If chosen by `use_cache_branch`. The decoder takes input_ids,
encoder_attention_mask, encoder_hidden_states and `past_key_values.<layer>.<decoder|encoder>.<key|value>`
and gives logits and `present.<layer>.<decoder|encoder>.<key|value>`: the decoder's own cache grows
by a token a step; the encoder's (cross-attention keys and values) is computed by the first step,
and the branch with a cache gives empty placeholders for it, as Optimum's does. T5's norms are
RMSNorms, BART's LayerNorms.

Needs transformers (the `dev` extra). Used by the tests of export.decode's encoder-decoder loop."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

ENC, DEC, PAST = "encoder_sequence_length", "decoder_sequence_length", "past_decoder_sequence_length"
TOTAL = f"{PAST} + {DEC}"


def _model(arch: str, hidden: int, layers: int, heads: int, ffn: int, vocab: int):
    import transformers

    if arch == "t5":
        config = transformers.T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=ffn,
                                       num_layers=layers, num_heads=heads, decoder_start_token_id=0, pad_token_id=0,
                                       eos_token_id=1)
        return transformers.T5ForConditionalGeneration(config), config
    if arch == "bart":
        config = transformers.BartConfig(vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                                         encoder_attention_heads=heads, decoder_attention_heads=heads,
                                         encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=128,
                                         decoder_start_token_id=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                         forced_eos_token_id=None)
        return transformers.BartForConditionalGeneration(config), config
    raise ValueError(f"unknown arch {arch!r}; choose t5 or bart")


def export_hf_seq2seq(folder: Path, arch: str = "t5", seed: int = 0, hidden: int = 64, layers: int = 2,
                      heads: int = 4, ffn: int = 128, vocab: int = 100, halves: bool = False):
    """Write encoder_model.onnx, decoder_model_merged.onnx and config.json (with the decoder's start
    token) to `folder` (opset 17, fp32), and with `halves` also the two graphs merged, as Optimum
    names them (decoder_model.onnx, decoder_with_past_model.onnx); returns the torch model (for
    transformers' own generate)."""
    import onnx
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    torch.manual_seed(seed)
    model, config = _model(arch, hidden, layers, heads, ffn, vocab)
    model = model.eval()
    with torch.no_grad():  # wider than transformers' initialisation, which picks one token over and
        for weight in model.parameters():  # over again: a cache gone wrong would not show in the tokens
            if weight.dim() >= 2:
                weight.normal_(0.0, 3.0 / weight.shape[-1] ** 0.5)
    # torch's TorchScript export changes the state of transformers' T5 (its encoder computes other
    # values afterwards; the exported graph is the model before): callers get an untouched copy
    untouched = copy.deepcopy(model)
    head_dim = hidden // heads
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [(layer, side, t) for layer in range(layers) for side in ("decoder", "encoder") for t in ("key", "value")]
    own = [k for k in kinds if k[1] == "decoder"]

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model  # a submodule, so its weights export as weights

    class Encoder(Wrapper):
        def forward(self, input_ids, attention_mask):
            return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def run_decoder(input_ids, encoder_attention_mask, encoder_hidden_states, cache):
        out = model(decoder_input_ids=input_ids, encoder_outputs=(encoder_hidden_states,),
                    attention_mask=encoder_attention_mask, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    class FirstStep(Wrapper):  # no cache yet: computes both
        def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states):
            cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
            logits, cache = run_decoder(input_ids, encoder_attention_mask, encoder_hidden_states, cache)
            caches = {"decoder": cache.self_attention_cache.layers, "encoder": cache.cross_attention_cache.layers}
            return (logits, *(getattr(caches[side][layer], t + "s") for layer, side, t in kinds))

    class NextStep(Wrapper):  # the encoder's keys and values come in, only the decoder's grow
        def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, *past):
            own_cache, cross = DynamicCache(config=config), DynamicCache(config=config)
            for layer in range(layers):
                own_cache.update(past[4 * layer], past[4 * layer + 1], layer)
                cross.update(past[4 * layer + 2], past[4 * layer + 3], layer)
            logits, cache = run_decoder(input_ids, encoder_attention_mask, encoder_hidden_states,
                                        EncoderDecoderCache(own_cache, cross))
            layers_ = cache.self_attention_cache.layers
            return (logits, *(getattr(layers_[layer], t + "s") for layer, _, t in own))

    name = {k: f"{k[0]}.{k[1]}.{k[2]}" for k in kinds}
    past_in = [f"past_key_values.{name[k]}" for k in kinds]
    ids = torch.randint(3, vocab, (1, 5))
    mask = torch.ones(1, 5, dtype=torch.int64)
    states = torch.randn(1, 5, hidden)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(), (ids, mask), str(folder / "encoder_model.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch_size", 1: ENC}, "attention_mask": {0: "batch_size", 1: ENC},
                                        "last_hidden_state": {0: "batch_size", 1: ENC}}, opset_version=17)
        step_axes = {"input_ids": {0: "batch_size", 1: DEC}, "encoder_attention_mask": {0: "batch_size", 1: ENC},
                     "encoder_hidden_states": {0: "batch_size", 1: ENC}, "logits": {0: "batch_size", 1: DEC}}
        first = folder / "decoder_model.onnx"
        torch.onnx.export(FirstStep(), (ids[:, :1], mask, states), str(first), dynamo=False,
                          input_names=["input_ids", "encoder_attention_mask", "encoder_hidden_states"],
                          output_names=["logits", *(f"present.{name[k]}" for k in kinds)],
                          dynamic_axes={**step_axes, **{f"present.{name[k]}": {0: "batch_size", 2: DEC if k[1] == "decoder" else ENC}
                                                        for k in kinds}}, opset_version=17)
        past = [torch.randn(1, heads, 3 if side == "decoder" else 5, head_dim) for _, side, _ in kinds]
        nxt = folder / "decoder_with_past_model.onnx"
        torch.onnx.export(NextStep(), (ids[:, :1], mask, states, *past), str(nxt), dynamo=False,
                          input_names=["input_ids", "encoder_attention_mask", "encoder_hidden_states", *past_in],
                          output_names=["logits", *(f"present.{name[k]}" for k in own)],
                          dynamic_axes={**step_axes,
                                        **{p: {0: "batch_size", 2: PAST if k[1] == "decoder" else ENC} for p, k in zip(past_in, kinds)},
                                        **{f"present.{name[k]}": {0: "batch_size", 2: TOTAL} for k in own}},
                          opset_version=17)
    merged = _merge(onnx.load(str(first)), onnx.load(str(nxt)), kinds, name, heads, head_dim)
    onnx.save(merged, str(folder / "decoder_model_merged.onnx"))
    if not halves:
        first.unlink()
        nxt.unlink()
    (folder / "config.json").write_text(config.to_json_string())
    return untouched


def _merge(first, nxt, kinds, name, heads: int, head_dim: int):
    """One model holding `first` (use_cache_branch false) and `nxt` (true) in the branches of an If,
    their weights in the main graph, as Optimum's merge_decoders writes it: the branch with a cache
    gives an empty [0] placeholder for each of the encoder's keys and values."""
    import onnx
    from onnx import TensorProto, helper

    # The weights go to the main graph once. TorchScript names some of them by number (onnx::MatMul_97),
    # so a name both exports use may hold different weights: the second one is renamed.
    weights = {tensor.name: tensor for tensor in first.graph.initializer}
    renamed = {}
    for tensor in nxt.graph.initializer:
        if tensor.name in weights and weights[tensor.name].SerializeToString() != tensor.SerializeToString():
            renamed[tensor.name] = tensor.name + "__with_past"
            tensor = onnx.TensorProto.FromString(tensor.SerializeToString())
            tensor.name = renamed[tensor.name]
        weights.setdefault(tensor.name, tensor)
    for node in nxt.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]

    def body(model, label):
        graph = model.graph
        outputs = list(graph.output)
        nodes = list(graph.node)
        if label == "with_past":
            produced = {o.name for o in outputs}
            for layer, side, t in kinds:
                present = f"present.{name[(layer, side, t)]}"
                if present not in produced:
                    nodes.append(helper.make_node("Constant", [], [present], value=helper.make_tensor(
                        present + "_placeholder", TensorProto.FLOAT, [0], [])))
            order = ["logits", *(f"present.{name[k]}" for k in kinds)]
            outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in order]
        return helper.make_graph(nodes, f"{label}_branch", [], outputs)

    def info(n, shape):
        return helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)

    else_branch, then_branch = body(first, "no_past"), body(nxt, "with_past")
    for branch in (else_branch, then_branch):
        for output in branch.output:
            output.type.tensor_type.ClearField("shape")
    out_names = ["logits", *(f"present.{name[k]}" for k in kinds)]
    if_node = helper.make_node("If", ["use_cache_branch"], out_names, name="optimum::if",
                               then_branch=then_branch, else_branch=else_branch)
    vocab = first.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    inputs = list(first.graph.input)  # TorchScript drops an input its graph does not read
    inputs += [i for i in nxt.graph.input if i.name not in {j.name for j in inputs}]
    inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    outputs = [info("logits", ["batch_size", DEC, vocab])]
    outputs += [info(f"present.{name[k]}", ["batch_size", heads, TOTAL if k[1] == "decoder" else ENC, head_dim]) for k in kinds]
    graph = helper.make_graph([if_node], "merged_decoder", inputs, outputs, initializer=list(weights.values()))
    merged = helper.make_model(graph, opset_imports=list(first.opset_import))
    merged.ir_version = first.ir_version
    onnx.checker.check_model(merged)
    return merged
