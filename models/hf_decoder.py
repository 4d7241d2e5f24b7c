"""A randomly initialised LLaMA (or Qwen3, Gemma, GPT-2) decoder with its KV cache (transformers' modelling code,
nothing downloaded), exported with TorchScript the way optimum names its inputs and outputs: input_ids,
attention_mask ('past_sequence_length + sequence_length' long), position_ids and
past_key_values.<layer>.<key|value> in; logits and present.<layer>.<key|value> out. fp32 and fp16
export; bf16 fails in torch's TorchScript exporter (LLaMA's rotary embedding).

Needs transformers (the `dev` extra). The tests use the tiny default; bench/decode.py larger ones."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

PAST, SEQ, TOTAL = "past_sequence_length", "sequence_length", "past_sequence_length + sequence_length"


def export_hf_decoder(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                         kv_heads: int = 2, ffn: int = 128, vocab: int = 100, positions: int = 128,
                         dtype: str = "float32", arch: str = "llama"):
    """Export to `path` (opset 17, weights and cache in `dtype`); returns the torch model (for
    transformers' own generate). `arch`: "llama"; "qwen3" (RMSNorms on each head's queries and keys
    too); "gemma" (RMSNorm scaled by 1 + w); "gpt2" (LayerNorm, no grouped heads)."""
    import torch
    import transformers
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, vocab_size=vocab,
                                         n_positions=positions)
        model = transformers.GPT2LMHeadModel(config)
        kv_heads = heads
    elif arch in ("llama", "qwen3", "gemma"):
        config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                                     "gemma": ("GemmaConfig", "GemmaForCausalLM")}[arch]
        shape = {"head_dim": hidden // heads} if arch != "llama" else {}
        config = getattr(transformers, config_class)(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                                     num_hidden_layers=layers, num_attention_heads=heads,
                                                     num_key_value_heads=kv_heads, max_position_embeddings=positions,
                                                     **shape)
        model = getattr(transformers, model_class)(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose llama, qwen3, gemma or gpt2")
    model = model.eval().to(getattr(torch, dtype))
    head_dim = hidden // heads

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *cache):
            past = DynamicCache(config=config)
            for layer in range(layers):
                past.update(cache[2 * layer], cache[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    cache = [f"{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{c}" for c in cache)]
    outputs = ["logits", *(f"present.{c}" for c in cache)]
    axes = {"input_ids": {0: "batch_size", 1: SEQ}, "attention_mask": {0: "batch_size", 1: TOTAL},
            "position_ids": {0: "batch_size", 1: SEQ}, "logits": {0: "batch_size", 1: SEQ},
            **{f"past_key_values.{c}": {0: "batch_size", 2: PAST} for c in cache},
            **{f"present.{c}": {0: "batch_size", 2: TOTAL} for c in cache}}
    example = (torch.randint(0, vocab, (1, 4)), torch.ones(1, 7, dtype=torch.int64), torch.arange(3, 7)[None],
               *(torch.randn(1, kv_heads, 3, head_dim, dtype=getattr(torch, dtype)) for _ in cache))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(WithCache(), example, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=17)
    return model
