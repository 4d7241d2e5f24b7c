"""Greedy decoding with a KV-cache decoder: a built model served inside a generation loop.

    python -m export.decode decoder.onnx --prompt 8 --tokens 32
    python -m export.decode decoder.onnx --prompt 6,3,5          # a batch of three, padded on the left
    python -m export.decode reference.onnx --compare fused-cpu.onnx --json decode.json

The model is a decoder as optimum and onnxruntime-genai export one: inputs `input_ids`,
`attention_mask` (as long as the cache plus the new tokens), optionally `position_ids`, and a
cache input `past_key_values.<name>` for every output `present.<name>`; the first output, or the
one called `logits`, gives the scores. A merged decoder (Optimum's decoder_model_merged.onnx) also
takes `use_cache_branch`: false for the prefill, true for the steps. The prompt runs with an empty cache (prefill); each step
then feeds the highest-scoring token and the cache the step before returned. On ONNX Runtime's
CUDA provider the cache stays in GPU memory from one step to the next (I/O binding), as a server
keeps it, and only the scores come to the host; on the CPU provider numpy in and out costs no copy
already (ONNX Runtime hands its output buffers to numpy), and binding measured slower there, so
the plain run is used. `--cache kept|host` chooses either way on any provider.

An encoder-decoder as Optimum exports one (T5, BART, Whisper: encoder_model.onnx, and
decoder_model_merged.onnx taking encoder_hidden_states and, per layer,
`past_key_values.N.decoder.*` and `past_key_values.N.encoder.*`) runs with `--encoder`: the encoder
once per generation on random inputs, then the decoder from its start token. Its own cache grows
a token a step; the encoder's keys and values come from the first step and are fed back unchanged
(the merged decoder's branch with a cache returns placeholders for them). A folder holding the two
halves instead (decoder_model.onnx, decoder_with_past_model.onnx) runs them as the merged form's
branches (`decoder_files.SplitDecoder`).

    python -m export.decode decoder_model_merged.onnx --encoder encoder_model.onnx --prompt 16
    python -m export.decode t5/ --compare fused/        # folders in Optimum's layout

With `--compare`, the second model decodes the first model's tokens (teacher forcing), so its
scores are compared at every step, against the first model's as written (ONNX Runtime's own graph
fusions off, as in export.validate) and the dtype's graph tolerance (normops.tolerances.GRAPH),
and the steps where its own choice differs are counted. Both are timed: the prefill, and every
decode step after a warm-up generation; with `--rounds N`, N generations each, the two models
taking turns to go first. ONNX models only: a TensorRT engine's profile starts its
cache axis at 1, and the prefill needs 0.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .decoder_files import CACHE_BRANCH, FOLDER_HALVES, Halves, as_path, config_value, load_decoder, resolve_folder
from .errors import NormfuseError, UsageError

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
# An encoder-decoder's decoder (T5, BART, Whisper as Optimum exports them) reads the encoder's
# output through these inputs, the same at every step
ENCODER_STATES = "encoder_hidden_states"
CONTEXT_INPUTS = (ENCODER_STATES, "encoder_attention_mask")


@dataclass(frozen=True)
class Decoder:
    """Which inputs and outputs of a model make it a KV-cache decoder."""

    logits: str
    cache: tuple[tuple[str, str], ...]  # (past input, present output)
    cache_shapes: dict[str, tuple[int | None, ...]]  # past input -> shape with None on the cache axis
    position_ids: bool
    cache_branch: bool = False  # a merged decoder: `use_cache_branch` false for the prefill, true after
    attention_mask: bool = True  # an encoder-decoder's decoder may take none (T5 masks by position)
    context: tuple[str, ...] = ()  # CONTEXT_INPUTS it takes: an encoder-decoder's
    # caches that do not grow (the encoder's keys and values, for cross-attention): the first step
    # computes them and every later one reads them; Optimum's branch with a cache returns placeholders
    fixed_cache: tuple[str, ...] = ()


def cache_pairs(input_names) -> tuple[tuple[str, str], ...]:
    """(past input, present output it pairs with) for every `past_key_values.X` input."""
    return tuple((name, PRESENT_PREFIX + name[len(PAST_PREFIX):]) for name in input_names if name.startswith(PAST_PREFIX))


def is_decoder(model_path: str | Path) -> bool:
    """Whether an ONNX file's input and output names are a KV-cache decoder's (read without weights)."""
    from .triton_repo import onnx_signature

    inputs, outputs = onnx_signature(model_path)
    names, produced = {i.name for i in inputs}, {o.name for o in outputs}
    cache = cache_pairs(names)
    return bool(cache) and {"input_ids", "attention_mask"} <= names and all(p in produced for _, p in cache)


def is_encoder_decoders_decoder(model_path: str | Path) -> bool:
    """Whether an ONNX file is an encoder-decoder's KV-cache decoder (it reads encoder_hidden_states)."""
    from .triton_repo import onnx_signature

    inputs, _ = onnx_signature(model_path)
    names = {i.name for i in inputs}
    return ENCODER_STATES in names and "input_ids" in names and bool(cache_pairs(names))


def decoder_of(model, where: str, dims: dict[str, int] | None = None) -> Decoder:
    """The decoder signature of a loaded model (export.runtime), or a one-line NormfuseError saying
    what is missing. A cache has one axis that grows, the cache length: the dynamic axis whose name
    changes from the past input to the present output (ONNX Runtime GenAI: past_sequence_length to
    total_sequence_length), or else the one dynamic axis besides the batch. Its other dynamic axes
    (GenAI's kv_cache_dim, the head size) take their sizes from `dims` (--dim NAME=SIZE)."""
    inputs = {spec.name: spec for spec in model.inputs}
    output_specs = {spec.name: spec for spec in model.outputs}
    outputs = list(output_specs)
    cache = cache_pairs(inputs)
    seq2seq = ENCODER_STATES in inputs
    # Optimum's decoder_model.onnx (no cache in) or decoder_with_past_model.onnx (the encoder's
    # keys and values in, only the decoder's own out)
    unpaired = [present for _, present in cache if present not in outputs]
    split = (not cache and seq2seq) or (unpaired and all(".encoder." in present for present in unpaired))
    if split and "input_ids" in inputs:
        raise NormfuseError(f"{where}: one half of an encoder-decoder's decoder ({'with' if cache else 'without'} "
                            f"its cache); decode the folder holding both ({' and '.join(FOLDER_HALVES)}), or the "
                            "merged form, decoder_model_merged.onnx")
    if not cache or "input_ids" not in inputs or ("attention_mask" not in inputs and not seq2seq):
        raise NormfuseError(f"{where}: not a KV-cache decoder (it needs input_ids, attention_mask (or, an "
                            f"encoder-decoder's, {ENCODER_STATES}) and {PAST_PREFIX}* inputs; it takes {', '.join(inputs)})")
    missing = [present for _, present in cache if present not in outputs]
    if missing:
        raise NormfuseError(f"{where}: cache output {missing[0]} is missing (each {PAST_PREFIX}X input needs a "
                            f"{PRESENT_PREFIX}X output)")
    branch = (CACHE_BRANCH in inputs and inputs[CACHE_BRANCH].dtype == "bool"
              and math.prod(d or 1 for d in inputs[CACHE_BRANCH].shape) == 1)
    context = tuple(name for name in CONTEXT_INPUTS if seq2seq and name in inputs)
    others = sorted(set(inputs) - set(TOKEN_INPUTS) - set(context) - {past for past, _ in cache}
                    - ({CACHE_BRANCH} if branch else set()))
    if others:
        raise NormfuseError(f"{where}: input {others[0]!r} is neither a token input ({', '.join(TOKEN_INPUTS)}) "
                            "nor a cache")
    shapes = {past: _cache_shape(inputs[past], output_specs[present], dims or {}, where) for past, present in cache}
    logits = "logits" if "logits" in outputs else outputs[0]
    fixed = tuple(past for past, present in cache if seq2seq and _does_not_grow(inputs[past], output_specs[present]))
    return Decoder(logits, cache, shapes, "position_ids" in inputs, branch, "attention_mask" in inputs, context, fixed)


def _does_not_grow(past, present) -> bool:
    """Whether a cache's present output has its past input's axes, every dynamic one by the same
    name (the encoder's keys and values: [batch_size, heads, encoder_sequence_length, head_size])."""
    from .dims import dim_params

    names = dim_params(past)
    return (len(past.shape) == len(present.shape) and names == dim_params(present)
            and any(name is not None for name in names[1:]) and list(past.shape) == list(present.shape))


def cache_length(inputs, outputs, feeds: dict) -> int | None:
    """The cache length of `feeds` for a decoder of this signature (specs with dim_params): the
    size, in its first past_key_values input, of the axis whose name the present output changes;
    None when there is no such input or axis."""
    present_specs = {spec.name: spec for spec in outputs}
    for past, present in cache_pairs(spec.name for spec in inputs):
        spec = next(s for s in inputs if s.name == past)
        if past not in feeds or present not in present_specs:
            continue
        growing = _named_growing_axes(spec, present_specs[present])
        if growing:
            return int(np.shape(feeds[past])[growing[0]])
    return None


def _named_growing_axes(past, present) -> list[int]:
    """The dynamic axes after the batch of a past input whose name its present output changes
    (`past_sequence_length` to `past_sequence_length + 1`): the cache length, where names tell."""
    from .dims import dim_params

    names, present_names = dim_params(past), dim_params(present) + (None,) * len(past.shape)
    return [axis for axis, dim in enumerate(past.shape)
            if dim is None and axis != 0 and names[axis] is not None and present_names[axis] != names[axis]]


def mask_over_the_cache(feeds: dict, inputs, outputs) -> None:
    """Made-up inputs of a merged decoder whose `use_cache_branch` is true: the attention mask
    covers the cache and the new tokens, as that branch reads it (Optimum declares the mask
    [batch_size, sequence_length], as the branch without a cache takes it). Others are left alone."""
    branch = feeds.get(CACHE_BRANCH)
    mask = feeds.get("attention_mask")
    if branch is None or not np.all(branch) or mask is None or np.ndim(mask) != 2 or "input_ids" not in feeds:
        return
    cached = cache_length(inputs, outputs, feeds)
    if cached:
        feeds["attention_mask"] = np.ones((mask.shape[0], cached + np.shape(feeds["input_ids"])[1]), mask.dtype)


def _cache_shape(past, present, dims: dict[str, int], where: str) -> tuple[int | None, ...]:
    """`past`'s shape with None on the cache-length axis and every other axis sized (see decoder_of)."""
    from .dims import dim_params

    names = dim_params(past)
    dynamic = [axis for axis, dim in enumerate(past.shape) if dim is None and axis != 0]
    growing = _named_growing_axes(past, present)
    if len(growing) != 1:  # the names do not tell: the cache length is the one axis not sized by --dim
        growing = [axis for axis in dynamic if names[axis] not in dims]
    if not growing and _does_not_grow(past, present):
        # an encoder's keys and values with every axis sized by --dim (encoder_sequence_length): the
        # first step computes them whatever is fed, and every later one reads them back
        return tuple(dims[names[axis]] if axis in dynamic else dim for axis, dim in enumerate(past.shape))
    if len(growing) != 1:
        named = ", ".join(names[axis] or f"axis {axis}" for axis in dynamic)
        raise NormfuseError(f"{where}: cache input {past.name!r} {past.describe()} has dynamic axes {named} besides the "
                            "batch; one is the cache length, size the others with --dim NAME=SIZE (e.g. the head size)")
    fixed = {}
    for axis in dynamic:
        if axis != growing[0]:
            if names[axis] not in dims:
                raise NormfuseError(f"{where}: cache input {past.name!r} axis {axis} ({names[axis] or 'unnamed'}) "
                                    "is dynamic but not the cache length: give its size with --dim NAME=SIZE")
            fixed[axis] = dims[names[axis]]
    return tuple(None if axis == growing[0] else fixed.get(axis, dim) for axis, dim in enumerate(past.shape))


@dataclass
class Generation:
    tokens: list[list[int]]  # per step (prefill first), one token per sequence of the batch
    step_logits: list[np.ndarray] = field(default_factory=list)  # scores of the last position, per step
    prefill_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)  # decode steps after the prefill
    encoder_ms: float | None = None  # an encoder-decoder's encoder run, before the prefill


CACHE_WAYS = ("auto", "kept", "host")


def keeps_cache(model, cache: str) -> bool:
    """Whether the cache stays with ONNX Runtime between steps: `kept`, or `auto` on the CUDA
    provider (see the module doc); `host` goes through numpy."""
    if cache not in CACHE_WAYS:
        raise UsageError(f"cache {cache!r}: choose from {', '.join(CACHE_WAYS)}")
    return hasattr(model, "run_keeping") and (cache == "kept" or (cache == "auto" and getattr(model, "on_cuda", False)))


def generate(model, decoder: Decoder, prompt: np.ndarray, new_tokens: int,
             forced: list[list[int]] | None = None, cache_way: str = "auto",
             prompt_mask: np.ndarray | None = None, context: dict | None = None) -> Generation:
    """Greedy decoding of `new_tokens` tokens after `prompt` (batch x length int64); with `forced`,
    the given tokens are fed instead of the model's own choices (its choices are still recorded).
    `cache_way`: where the cache goes between steps (`keeps_cache`). `prompt_mask` (batch x length,
    0 on padding) lets prompts of different lengths share a batch, padded on the left: the mask
    keeps padding out of attention and positions count real tokens only, as transformers'
    `generate` numbers them. `context`: the inputs an encoder-decoder's decoder reads at every step
    (its CONTEXT_INPUTS, from `encode`); `prompt` is then the decoder's start token."""
    batch = prompt.shape[0]
    mask = np.ones(prompt.shape, np.int64) if prompt_mask is None else np.asarray(prompt_mask, np.int64)
    if mask.shape != np.shape(prompt):
        raise UsageError(f"prompt_mask is {'x'.join(map(str, mask.shape))}, the prompt "
                         f"{'x'.join(map(str, np.shape(prompt)))}: one mask value per prompt token")
    cache = {past: np.zeros([batch if axis == 0 else (0 if dim is None else dim) for axis, dim in enumerate(shape)],
                            dtype=_input_dtype(model, past))
             for past, shape in decoder.cache_shapes.items()}
    types = {name: _input_dtype(model, name) for name in TOKEN_INPUTS
             if (name != "position_ids" or decoder.position_ids) and (name != "attention_mask" or decoder.attention_mask)}
    presents = [present for _, present in decoder.cache]
    keeping = keeps_cache(model, cache_way)
    result = Generation(tokens=[])
    ids = prompt
    for step in range(new_tokens):
        feeds = {"input_ids": ids.astype(types["input_ids"]), **(context or {}), **cache}
        if decoder.attention_mask:
            feeds["attention_mask"] = mask.astype(types["attention_mask"])
        if decoder.position_ids:
            feeds["position_ids"] = positions(mask)[:, -ids.shape[1]:].astype(types["position_ids"])
        if decoder.cache_branch:
            feeds[CACHE_BRANCH] = np.full(_input_shape(model, CACHE_BRANCH), step > 0)
        started = time.perf_counter()
        if keeping:
            outputs, kept = model.run_keeping(feeds, presents)
        else:
            outputs = kept = model.run(feeds)
        elapsed = (time.perf_counter() - started) * 1000.0
        if step == 0:
            result.prefill_ms = elapsed
        else:
            result.step_ms.append(elapsed)
        scores = np.asarray(outputs[decoder.logits])[:, -1, :]
        chosen = scores.astype(np.float32).argmax(-1)
        result.tokens.append([int(t) for t in chosen])
        result.step_logits.append(scores)
        fed = np.asarray(forced[step] if forced is not None else chosen, dtype=np.int64)
        ids = fed.reshape(batch, 1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        cache = {past: cache[past] if step and past in decoder.fixed_cache else kept[present]
                 for past, present in decoder.cache}
    return result


def encode(encoder, feeds: dict, decoder: Decoder) -> tuple[dict, float]:
    """Run an encoder-decoder's encoder once: (the decoder's context inputs, milliseconds taken).
    Its first output is the states; the decoder's mask over them is the encoder's own
    attention_mask, or all ones for an encoder without one (Whisper's)."""
    started = time.perf_counter()
    outputs = encoder.run(feeds)
    elapsed = (time.perf_counter() - started) * 1000.0
    states = np.asarray(outputs[encoder.outputs[0].name])
    context = {ENCODER_STATES: states}
    if "encoder_attention_mask" in decoder.context:
        mask = feeds.get("attention_mask", np.ones(states.shape[:2], np.int64))
        context["encoder_attention_mask"] = np.asarray(mask)
    return context, elapsed


def positions(mask: np.ndarray) -> np.ndarray:
    """Position of every token under an attention mask: real tokens counted from 0, padding at 1
    (what transformers' generate feeds; attention never reads it)."""
    counted = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, counted)


def _input_dtype(model, name: str):
    from normops import numpy_dtype

    return numpy_dtype(next(spec.dtype for spec in model.inputs if spec.name == name))


def _input_shape(model, name: str) -> tuple[int, ...]:
    return tuple(1 if dim is None else dim for dim in next(spec.shape for spec in model.inputs if spec.name == name))


def timing(generations: list[Generation], batch: int) -> dict:
    """Prefill and encoder (medians over the generations) and decode-step times (every step of every
    generation)."""
    step_ms = [ms for g in generations for ms in g.step_ms]
    steps = np.asarray(step_ms) if step_ms else np.asarray([np.nan])
    p50 = float(np.median(steps))
    encoder = [g.encoder_ms for g in generations if g.encoder_ms is not None]
    return {**({"encoder_ms": round(float(np.median(encoder)), 4)} if encoder else {}),
            "prefill_ms": round(float(np.median([g.prefill_ms for g in generations])), 4),
            "step_ms": {"p50": p50, "p99": float(np.percentile(steps, 99)), "mean": float(steps.mean())},
            "decode_tokens_per_s": batch / (p50 / 1000.0) if step_ms else None,
            "raw_step_ms": [[round(v, 4) for v in g.step_ms] for g in generations]}


def agreement(tokens: list[list[int]], expected: Generation, candidate: Generation, dtype: str) -> dict:
    """Step by step: does the candidate (fed `tokens`) choose those tokens, and are its scores within
    the graph tolerance of `expected`'s (the reference fed the same tokens)?

    A step where it chooses another token whose reference score is within tolerance of the chosen
    one's is a near tie, not a disagreement: half-precision scores tie often, and either choice is
    the reference's to within its own rounding."""
    from normops import GRAPH

    from .validate import output_stats

    tolerance = GRAPH[dtype]
    for step, (r, c) in enumerate(zip(expected.step_logits, candidate.step_logits)):
        if np.shape(r) != np.shape(c):
            raise NormfuseError(f"step {step}: the compared decoder's scores are {list(np.shape(c))}, the reference's "
                                f"{list(np.shape(r))}: not a form of the same decoder")
    steps = [output_stats(np.asarray(c), np.asarray(r), tolerance)
             for r, c in zip(expected.step_logits, candidate.step_logits)]
    same = ties = 0
    for want, got, scores in zip(tokens, candidate.tokens, expected.step_logits):
        if want == got:
            same += 1
            continue
        rows = np.asarray(scores, dtype=np.float64)
        gaps = [(row[w] - row[g], abs(row[w])) for row, w, g in zip(rows, want, got) if w != g]
        ties += all(gap <= tolerance.atol + tolerance.rtol * size for gap, size in gaps)
    return {"steps": len(steps), "same_tokens": same, "near_ties": ties,
            "scores_within_tolerance": all(s["passed"] for s in steps),
            "max_abs": max(s["max_abs"] for s in steps), "max_rel": max(s["max_rel"] for s in steps),
            "first_step_out_of_tolerance": next((i for i, s in enumerate(steps) if not s["passed"]), None)}


def decode(model_path: str | Path | Halves, compare_path: str | Path | Halves | None = None, prompt: int | Sequence[int] = 8,
           tokens: int = 32, batch: int | None = None, seed: int = 0, warmup: int = 1,
           providers: list[str] | None = None, rounds: int = 1, cache: str = "auto",
           progress: Callable[[str], None] | None = None, dims: dict[str, int] | None = None,
           encoder_path: str | Path | None = None, compare_encoder_path: str | Path | None = None,
           start_token: int | None = None) -> dict:
    """Greedy decoding with `model_path` (and, teacher-forced, with `compare_path`); see the module doc.
    `prompt`: one length for each of `batch` sequences (default 1), or a length per sequence (left
    padded to the longest). `rounds` timed generations of each model, the two taking turns to go
    first, so drift in the machine's speed falls on both; the tokens and scores compared are the
    first round's. `progress(what)` is told each generation as it starts. `dims` sizes cache axes
    other than the cache length (`decoder_of`).

    An encoder-decoder (a decoder taking encoder_hidden_states) needs `encoder_path`: each
    generation runs the encoder on random inputs (`prompt` long where its length is dynamic; prompts
    of different lengths padded on the right and masked, as T5's and BART's tokenizers pad) and
    the decoder from `start_token` (default: decoder_start_token_id of a config.json beside the
    decoder, else 0); the compared decoder reads `compare_encoder_path`'s states (default: the
    same encoder's). `model_path` and `compare_path` may be folders in Optimum's layout, which
    give their decoder and encoder (`resolve_folder`)."""
    from .backends import index_bounds, random_arrays
    from .dims import sizes_it_has
    from .runtime import ENGINE_SUFFIXES, load

    if tokens < 2:
        raise UsageError(f"{tokens} tokens: decoding needs at least 2 (the prefill's and one decode step's)")
    if rounds < 1:
        raise UsageError(f"{rounds} rounds: decoding needs at least 1 timed round")
    lengths = [prompt] * (batch or 1) if isinstance(prompt, int) else list(prompt)
    if batch is not None and batch != len(lengths):
        raise UsageError(f"{len(lengths)} prompt lengths for a batch of {batch}: give one length, or one per sequence")
    if compare_encoder_path and not compare_path:
        raise UsageError("--compare-encoder goes with --compare: the encoder of the compared decoder")
    model_path, found = resolve_folder(model_path)
    compare_path, compare_found = resolve_folder(compare_path) if compare_path else (None, None)
    if found and not encoder_path:  # a folder's own encoder, unless one is given
        encoder_path = found
        compare_encoder_path = compare_encoder_path or compare_found
    paths = [as_path(model_path)] + ([as_path(compare_path)] if compare_path else [])
    encoder_paths = [Path(encoder_path), Path(compare_encoder_path or encoder_path)][:len(paths)] if encoder_path else []
    for path in paths + encoder_paths:
        if path.suffix in ENGINE_SUFFIXES:
            raise UsageError(f"{path}: decoding runs ONNX models (a TensorRT engine's cache axis starts at 1 in "
                             "its profile, and the prefill feeds an empty cache)")
    models = [load_decoder(path, providers) for path in paths]
    if dims:
        from .dims import check_given
        from .triton_repo import onnx_signature

        # a name neither the decoder nor its encoder has: a flag error
        named = list(models[0].inputs) + (onnx_signature(encoder_paths[0])[0] if encoder_paths else [])
        check_given(named, dims, str(paths[0]) + (f" or {encoder_paths[0]}" if encoder_paths else ""))
    decoders = [decoder_of(model, str(path), dims) for model, path in zip(models, paths)]
    seq2seq = bool(decoders[0].context)
    for path, decoder in zip(paths, decoders):
        if bool(decoder.context) != seq2seq:
            raise NormfuseError(f"{path}: {'takes' if decoder.context else 'does not take'} {ENCODER_STATES}, "
                                f"{paths[0]} {'does' if seq2seq else 'does not'}: not a form of the same decoder")
    if seq2seq and not encoder_path:
        raise UsageError(f"{paths[0]}: an encoder-decoder's decoder (it reads {ENCODER_STATES}): give its encoder "
                         "with --encoder ENCODER.onnx")
    if encoder_path and not seq2seq:
        raise UsageError(f"{paths[0]}: --encoder given, but the decoder takes no {ENCODER_STATES}")
    batch = len(lengths)
    longest = max(lengths)
    # a pair of two dtypes (an fp16 export against the fp32 one) is judged by the less precise, as
    # export.validate judges a pair, whichever is given first
    from .validate import LEAST_PRECISE_FIRST

    dtypes = [next(spec.dtype for spec in model.outputs if spec.name == decoder.logits)
              for model, decoder in zip(models, decoders)]
    dtype = next((d for d in LEAST_PRECISE_FIRST if d in dtypes), dtypes[0])
    if seq2seq:
        encoders = [load(path, providers=providers) for path in encoder_paths]
        encoder_feeds = random_arrays(encoders[0].inputs, batch, longest, seed=seed, bounds=index_bounds(encoder_paths[0]),
                                      dims=sizes_it_has(encoders[0].inputs, dims), where=str(encoder_paths[0]))
        if len(set(lengths)) > 1:
            _pad_on_the_right(encoder_feeds, lengths, encoder_paths[0], config_value(paths[0], "pad_token_id"))
        start = config_value(paths[0], "decoder_start_token_id") if start_token is None else start_token
        ids = np.full((batch, 1), start, np.int64)
        mask = None
        shown_prompt = ([row[:length].tolist() for row, length in zip(encoder_feeds["input_ids"], lengths)]
                        if "input_ids" in encoder_feeds else [[start]] * batch)
    else:
        ids, mask, shown_prompt = _prompt(paths, decoders, lengths, tokens, seed, index_bounds)

    def one_generation(index: int, model, forced=None, encoder=None) -> Generation:
        context, encoder_ms = None, None
        if seq2seq:
            context, encoder_ms = encode(encoder or encoders[index], encoder_feeds, decoders[index])
            if "encoder_attention_mask" in context:
                context["encoder_attention_mask"] = context["encoder_attention_mask"].astype(
                    _input_dtype(model, "encoder_attention_mask"))
        done = generate(model, decoders[index], ids, tokens, forced, cache, mask, context)
        done.encoder_ms = encoder_ms
        return done

    labels = ("reference", "compared")
    say = progress or (lambda what: None)
    for warm in range(warmup):  # first runs allocate and plan: not what a served model's steps cost
        for index, (label, model) in enumerate(zip(labels, models)):
            say(f"warm-up {warm + 1}/{warmup}, {label}")
            one_generation(index, model)
    runs: list[list[Generation]] = [[] for _ in models]
    for round_ in range(rounds):
        # the reference goes first in the first round: the compared model is fed its tokens
        for index in (range(len(models)) if round_ % 2 == 0 else reversed(range(len(models)))):
            forced = runs[0][0].tokens if index else None
            say(f"round {round_ + 1}/{rounds}, {labels[index]}")
            runs[index].append(one_generation(index, models[index], forced))
    reference = runs[0][0]
    record = {"prompt": shown_prompt, "prompt_lengths": lengths,
              "new_tokens": tokens, "batch": batch, "dtype": dtype, "dtypes": dtypes, "warmup": warmup,
              "rounds": rounds, "cache": "kept" if keeps_cache(models[0], cache) else "host",
              "models": {label: {"model": str(path), "providers": model.providers, "tokens": generations[0].tokens,
                                 **timing(generations, batch)}
                         for label, path, model, generations in zip(labels, paths, models, runs)}}
    if seq2seq:
        record["start_token"] = int(ids[0, 0])
        record["encoder_inputs"] = {name: list(np.shape(value)) for name, value in encoder_feeds.items()}
        for label, path in zip(labels, encoder_paths):
            record["models"][label]["encoder"] = str(path)
    if compare_path:
        # scores are checked against the reference as written: ONNX Runtime's own fusions (which
        # rewrite the reference's norms too) are not what is being compared
        from .runtime import OrtModel

        models.clear()  # the timed models are done with: the one loaded next is not a third in memory
        if seq2seq:
            encoders.clear()
        gc.collect()
        say("the reference as written, for the scores")
        as_written = load_decoder(paths[0], providers, optimization="none")
        encoder = OrtModel(encoder_paths[0], providers=providers, optimization="none") if seq2seq else None
        expected = one_generation(0, as_written, reference.tokens, encoder)
        record["agreement"] = agreement(reference.tokens, expected, runs[1][0], dtype)
    return record


def _pad_on_the_right(feeds: dict, lengths: list[int], where: Path, pad: int) -> None:
    """An encoder's batch of inputs of different lengths, as a tokenizer pads them for T5 or BART:
    each row's tokens first, then `pad`, masked out by attention_mask (which the decoder reads too,
    as encoder_attention_mask)."""
    if "input_ids" not in feeds or "attention_mask" not in feeds:
        raise UsageError(f"{where}: prompts of different lengths need an encoder that takes input_ids and "
                         f"attention_mask (this one takes {', '.join(feeds)})")
    longest = feeds["input_ids"].shape[1]
    if longest != max(lengths):
        raise UsageError(f"{where}: prompts of different lengths, but the encoder's inputs are {longest} tokens long "
                         "(fixed by the model or a --dim)")
    keep = np.arange(longest)[None, :] < np.array(lengths)[:, None]
    feeds["input_ids"] = np.where(keep, feeds["input_ids"], pad).astype(feeds["input_ids"].dtype)
    feeds["attention_mask"] = keep.astype(feeds["attention_mask"].dtype)


def _prompt(paths, decoders, lengths, tokens, seed, index_bounds):
    """A decoder-only model's random prompt: (ids, mask, the prompts as shown), padded on the left."""
    bounds = index_bounds(paths[0])
    vocabulary = bounds.get("input_ids")
    longest = max(lengths)
    if "position_ids" in bounds and longest + tokens - 1 > bounds["position_ids"]:  # a table of learned positions
        raise UsageError(f"{paths[0]}: a {longest}-token prompt and {tokens} tokens reach position {longest + tokens - 2}, "
                         f"past the model's {bounds['position_ids']} positions; ask for fewer")
    if len(set(lengths)) > 1 and not all(d.position_ids for d in decoders):
        raise UsageError(f"{paths[0] if not decoders[0].position_ids else paths[1]}: prompts of different lengths "
                         "are padded, and a decoder without a position_ids input would number the padding too")
    if vocabulary is None:
        raise NormfuseError(f"{paths[0]}: cannot tell its vocabulary size (input_ids does not index a weight, "
                            "directly or reshaped)")
    for path in paths[1:]:  # the compared decoder must take the same tokens
        other = index_bounds(path).get("input_ids")
        if other is not None and other != vocabulary:
            raise NormfuseError(f"{path}: its vocabulary has {other} tokens, {paths[0]}'s {vocabulary}: not a form of "
                                "the same decoder")
    batch = len(lengths)
    ids = np.random.default_rng(seed).integers(0, vocabulary, size=(batch, longest)).astype(np.int64)
    mask = (np.arange(longest) >= longest - np.asarray(lengths)[:, None]).astype(np.int64)  # padding on the left
    ids[mask == 0] = 0
    return ids, mask, [row[longest - n:] for row, n in zip(ids.tolist(), lengths)]


def decoded_alike(agreement: dict) -> bool:
    """Every step chose the reference's token (or one in a near tie) and every step's scores are
    within tolerance."""
    return (agreement["same_tokens"] + agreement["near_ties"] == agreement["steps"]
            and agreement["scores_within_tolerance"])


def main(argv=None) -> int:
    from .cli import Parser, dim_size, int_at_least, non_negative_int, output_file, positive_int, run_cli
    from .files import require_file, write_json

    def prompt_lengths(text: str) -> list[int]:
        return [positive_int(part) for part in text.split(",")]

    parser = Parser(prog="python -m export.decode", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="KV-cache decoder (.onnx): input_ids, attention_mask, past_key_values.* in; "
                                      "logits, present.* out; or an encoder-decoder's (encoder_hidden_states in), "
                                      "with --encoder; or a folder as Optimum lays one out (decoder_model_merged.onnx "
                                      "or model.onnx, and encoder_model.onnx if any)")
    parser.add_argument("--encoder", metavar="ENCODER", help="an encoder-decoder's encoder (.onnx), run once per "
                                                             "generation on random inputs, --prompt long")
    parser.add_argument("--compare-encoder", metavar="ENCODER", help="the encoder of the --compare decoder (e.g. the "
                                                                      "fused one; default: --encoder)")
    parser.add_argument("--start-token", type=non_negative_int, help="an encoder-decoder's first decoder token (default: "
                                                                      "decoder_start_token_id of a config.json beside "
                                                                      "the model, else 0)")
    parser.add_argument("--compare", metavar="MODEL", help="a second decoder (e.g. the fused one), or its folder, fed "
                                                            "the first one's tokens: same choices, scores within "
                                                            "tolerance, and its speed")
    parser.add_argument("--prompt", type=prompt_lengths, default=[8], metavar="N[,N...]",
                        help="prompt length in tokens (random ids; default 8), or one per sequence, e.g. 6,3,5: "
                             "shorter prompts are padded on the left, as a server batches them (an encoder-decoder's "
                             "inputs to the encoder: padded on the right, as T5's and BART's tokenizers pad)")
    parser.add_argument("--tokens", type=lambda text: int_at_least(text, 2), default=32,
                        help="tokens to generate, at least 2: the prefill's and a decode step's (default 32)")
    parser.add_argument("--batch", type=positive_int, help="sequences decoded together (default 1, or one per "
                                                             "--prompt length)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed generations first (default 1)")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="timed generations of each model, taking turns to go first; step times pooled (default 1)")
    parser.add_argument("--cache", choices=CACHE_WAYS, default="auto",
                        help="between steps the KV cache is kept by ONNX Runtime (I/O binding; GPU memory on the CUDA "
                             "provider) or goes through numpy on the host; auto: kept on CUDA, numpy on the CPU, "
                             "where it costs no copy (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt (default 0)")
    parser.add_argument("--providers", help="ONNX Runtime providers, comma-separated (default: CUDA if present, CPU)")
    parser.add_argument("--json", type=output_file, help="write tokens, step times and the comparison as JSON")
    parser.add_argument("--plot", type=output_file, metavar="PNG", help="plot each decode step's time against the step")
    parser.add_argument("--dim", type=dim_size, action="append", default=[], metavar="NAME=SIZE",
                        help="size of a cache axis that is dynamic but not the cache length, e.g. kv_cache_dim=64 "
                             "(ONNX Runtime GenAI's head size); repeatable")
    args = parser.parse_args(argv)

    def job() -> int:
        from rich.console import Console

        from .decode_report import print_table, write_plot

        for path in filter(None, (args.model, args.compare, args.encoder, args.compare_encoder)):
            if not Path(path).is_dir():  # a folder in Optimum's layout is resolved by decode
                require_file(path)
        providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
        prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
        console = Console(highlight=False)
        with console.status("decoding ...") as status:
            record = decode(args.model, args.compare, prompt, args.tokens, args.batch, args.seed, args.warmup,
                            providers, args.rounds, args.cache, lambda what: status.update(f"decoding: {what} ..."),
                            dims=dict(args.dim), encoder_path=args.encoder,
                            compare_encoder_path=args.compare_encoder, start_token=args.start_token)
        print_table(record, console)
        if args.json:
            write_json(args.json, record)
        if args.plot:
            write_plot(record, args.plot)
        agree = record.get("agreement")
        return 0 if not agree or decoded_alike(agree) else 1

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
