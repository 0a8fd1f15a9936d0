"""Synthetic GGUF models with the Q4_K_M type mix of llama.cpp.

A :class:`Recipe` names an architecture (``llama``, ``qwen2`` or ``qwen3``; what
each one stores comes from ``teacher.config.ARCHS``) and its dims;
:func:`write_gguf` streams the file to disk one tensor (and, for big tensors,
one slab of rows) at a time, so a 7B-shape file never sits in memory.

Weights come two ways:

* ``"quantized"`` (small models): seeded normal values (std ``recipe.std``)
  encoded with this project's Q4_K/Q6_K encoders (and gguf-py's for Q5_0/Q8_0).
  Same recipe -> same bytes, so the file's sha256 is stable.
* ``"random-blocks"`` (large models): random bytes, with each block's f16 scale
  fields overwritten by finite values chosen so the decoded weights have std
  ``recipe.std`` and mean ~0 (Q4_K also gets its 6-bit sub-block mins set equal
  to its scales, so each sub-block is centred; symmetric types get a random
  sign on d, as real encoders produce). Every block is valid; nothing is
  quantized, which is what makes a 4.4 GiB file take seconds, not hours.

Tensor types follow ``llama_tensor_get_type`` (src/llama-quant.cpp) for
``LLAMA_FTYPE_MOSTLY_Q4_K_M``; see :func:`q4_k_m_type`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from teacher.config import ARCHS
from teacher.quants import BLOCK, QK_K, quantize, row_nbytes

__all__ = [
    "RECIPES",
    "WRITER_VERSION",
    "Recipe",
    "TensorPlan",
    "build_vocab",
    "plan_tensors",
    "q4_k_m_type",
    "use_more_bits",
    "write_gguf",
]

Q = GGMLQuantizationType

#: Bumped whenever the bytes a recipe produces change; part of the cache file name.
WRITER_VERSION = "w4"

Arch = Literal["llama", "qwen2", "qwen3"]
SYNTH_ARCHS = ("llama", "qwen2", "qwen3")
WeightMode = Literal["quantized", "random-blocks"]

_SLAB_BYTES = 64 << 20  # rows are generated and written in slabs of about this size


@dataclass(frozen=True)
class Recipe:
    name: str
    arch: Arch
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    context: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tied: bool = False
    qkv_bias: bool | None = None  # None: the architecture's default (qwen2 has q/k/v biases)
    key_length: int | None = None  # head dim when it is not hidden / heads (qwen3 style)
    # llama 3.x RoPE scaling (transformers' rope_type "llama3"), written as the
    # rope_freqs.weight factors llama.cpp's converter derives from it:
    # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    llama3_rope: tuple[float, float, float, int] | None = None
    sliding_window: int | None = None  # llama only: <arch>.attention.sliding_window (mistral style)
    weights: WeightMode = "quantized"
    seed: int = 0
    std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in SYNTH_ARCHS:
            raise ValueError(
                f"recipe {self.name}: architecture {self.arch!r} ({', '.join(SYNTH_ARCHS)})"
            )
        spec = ARCHS[self.arch]
        if self.llama3_rope is not None and not spec.rope_freq_factors:
            raise ValueError(f"recipe {self.name}: {self.arch} has no rope_freqs (llama3_rope)")
        if self.sliding_window is not None and spec.sliding_window != "every":
            raise ValueError(f"recipe {self.name}: {self.arch} has no sliding_window key")
        for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "context"):
            if getattr(self, k) <= 0:
                raise ValueError(f"recipe {self.name}: {k} must be positive")
        if (self.key_length is None and self.hidden % self.heads) or self.heads % self.kv_heads:
            raise ValueError(
                f"recipe {self.name}: hidden {self.hidden} / heads {self.heads} / "
                f"kv_heads {self.kv_heads} must divide evenly"
            )
        if self.head_dim % 2:
            raise ValueError(f"recipe {self.name}: head_dim must be even for RoPE")
        for k in ("hidden", "ffn"):
            if getattr(self, k) % 32:
                raise ValueError(f"recipe {self.name}: {k} must be a multiple of 32 (GGML blocks)")

    @property
    def head_dim(self) -> int:
        return self.key_length if self.key_length is not None else self.hidden // self.heads

    @property
    def has_qkv_bias(self) -> bool:
        return ARCHS[self.arch].qkv_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_qk_norm(self) -> bool:
        return ARCHS[self.arch].qk_norm

    @property
    def is_large(self) -> bool:
        return self.weights == "random-blocks"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # the embedded default teacher: qwen2, hidden a multiple of 256 so every matrix is a K-quant
        Recipe("tiny", "qwen2", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=2048,
               context=512, rope_theta=1e6, seed=1234),
        # its student: smaller vocab (1920 < 2048) and tied embeddings
        Recipe("tiny-student", "qwen2", hidden=128, layers=2, heads=2, kv_heads=1, ffn=256,
               vocab=1920, context=512, rope_theta=1e6, tied=True, seed=4321),
        Recipe("qwen2.5-7b-shape", "qwen2", hidden=3584, layers=28, heads=28, kv_heads=4,
               ffn=18944, vocab=152064, context=32768, rope_theta=1e6, weights="random-blocks",
               seed=7),
        Recipe("qwen2.5-0.5b-shape", "qwen2", hidden=896, layers=24, heads=14, kv_heads=2,
               ffn=4864, vocab=151936, context=32768, rope_theta=1e6, tied=True,
               weights="random-blocks", seed=5),
        # qwen3: q/k RMSNorm per head, no q/k/v biases, head dim (key_length 64) != hidden / heads
        Recipe("tiny-qwen3", "qwen3", hidden=256, layers=2, heads=8, kv_heads=2, ffn=512,
               vocab=2048, context=512, rope_theta=1e6, key_length=64, seed=3003),
        # llama 3.x: rope_freqs.weight from llama3 RoPE scaling. The original context (64)
        # is far below Llama 3.1's 8192 so that the scaled and smoothed bands cover most
        # rotated pairs at the short lengths a CPU test runs; factor 8 as in Llama 3.1.
        Recipe("tiny-llama3", "llama", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512,
               vocab=2048, context=512, rope_theta=5e5, rms_eps=1e-5,
               llama3_rope=(8.0, 1.0, 4.0, 64), seed=3001),
    )
}  # fmt: skip


# ---------------------------------------------------------------------------
# llama.cpp's Q4_K_M type choice


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits (C integer division; C % keeps the sign)."""
    d = i_layer - n_layers // 8
    c_mod = d - 3 * int(d / 3)  # C's truncating modulo
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or c_mod == 2


def _fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """llama.cpp's fallback when the row length is not a multiple of the chosen block."""
    if ncols % BLOCK[qtype][0] == 0:
        return qtype
    new = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}[qtype]
    return new if ncols % BLOCK.get(new, (32, 0))[0] == 0 else Q.F16


def q4_k_m_type(
    name: str, shape: tuple[int, ...], n_layers: int, has_output: bool
) -> GGMLQuantizationType:
    """The type llama.cpp's ``llama_tensor_get_type`` picks for LLAMA_FTYPE_MOSTLY_Q4_K_M.

    * 1-D tensors (norms, biases) are not quantized: F32.
    * ``output.weight`` (or ``token_embd.weight`` when there is no output):
      Q6_K, or Q8_0 when the row length is not a multiple of 256.
    * ``attn_v`` and ``ffn_down`` in the layers ``use_more_bits`` selects: Q6_K.
    * everything else: Q4_K.
    * then, if the row length is not a multiple of the block: Q4_K -> Q5_0,
      Q6_K -> Q8_0 (-> F16 if still not a multiple of 32).
    """
    if len(shape) < 2:
        return Q.F32
    ncols = shape[-1]
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        return Q.Q8_0 if ncols % QK_K else Q.Q6_K
    qtype = Q.Q4_K
    m = re.match(r"blk\.(\d+)\.", name)
    if m and ("attn_v.weight" in name or "ffn_down" in name):
        if use_more_bits(int(m.group(1)), n_layers):
            qtype = Q.Q6_K
    return _fallback(qtype, ncols)


# ---------------------------------------------------------------------------
# tensor plan


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # torch order
    qtype: GGMLQuantizationType
    kind: Literal["weight", "norm", "bias", "rope_freqs"]
    index: int  # position in the file; seeds this tensor's generator

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        return rows * row_nbytes(self.qtype, self.shape[-1])


def plan_tensors(r: Recipe) -> list[TensorPlan]:
    """Names, torch-order shapes and types of every tensor, in file order."""
    q_dim, kv_dim = r.heads * r.head_dim, r.kv_heads * r.head_dim
    specs: list[tuple[str, tuple[int, ...], Literal["weight", "norm", "bias", "rope_freqs"]]] = []
    if r.llama3_rope is not None:  # llama.cpp's converter writes it first
        specs.append(("rope_freqs.weight", (r.head_dim // 2,), "rope_freqs"))
    specs.append(("token_embd.weight", (r.vocab, r.hidden), "weight"))
    for i in range(r.layers):
        p = f"blk.{i}."
        specs.append((p + "attn_norm.weight", (r.hidden,), "norm"))
        for proj, dim in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
            specs.append((p + proj + ".weight", (dim, r.hidden), "weight"))
            if r.has_qkv_bias:
                specs.append((p + proj + ".bias", (dim,), "bias"))
        if r.has_qk_norm:
            specs += [
                (p + "attn_q_norm.weight", (r.head_dim,), "norm"),
                (p + "attn_k_norm.weight", (r.head_dim,), "norm"),
            ]
        specs += [
            (p + "attn_output.weight", (r.hidden, q_dim), "weight"),
            (p + "ffn_norm.weight", (r.hidden,), "norm"),
            (p + "ffn_gate.weight", (r.ffn, r.hidden), "weight"),
            (p + "ffn_up.weight", (r.ffn, r.hidden), "weight"),
            (p + "ffn_down.weight", (r.hidden, r.ffn), "weight"),
        ]
    specs.append(("output_norm.weight", (r.hidden,), "norm"))
    if not r.tied:
        specs.append(("output.weight", (r.vocab, r.hidden), "weight"))
    return [
        TensorPlan(name, shape, q4_k_m_type(name, shape, r.layers, not r.tied), kind, i)
        for i, (name, shape, kind) in enumerate(specs)
    ]


# ---------------------------------------------------------------------------
# vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# A little English to learn merges from, so common words become single tokens.
_CORPUS = (
    """
The quick brown fox jumps over the lazy dog. A teacher model gives its logits to a
student model, and the student learns to match them. The weights of the teacher stay
frozen while the student is trained. Quantized weights are stored in blocks; each block
has a scale and a minimum, and the values are small integers. The capital of France is
Paris. The capital of Germany is Berlin. Water boils at one hundred degrees. This is a
test of the tokenizer, which splits text into tokens and maps every token to a number.
In the beginning there was the word, and the word was a token. We measure memory, time
and error, and we write what we measured in the report. Every prediction can be tested,
and every test can fail. If it fails, the evidence says how. Numbers like 2024, 3.14 and
42 are split into digits. Hello, world! How are you today? I am fine, thank you.
"""
    * 3
)

_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|\s+")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_vocab(vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """A GPT-2-style byte-level BPE vocabulary of exactly ``vocab_size`` tokens.

    256 byte tokens, then merges learned greedily from a small English text, then
    (for big vocabularies) systematic merges of existing tokens with single
    characters, then the special tokens. Every merge joins two tokens already in
    the vocabulary into one that is added, as the tokenizers library requires.
    Returns (tokens, merges, token types: 1 normal, 3 control).
    """
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size {vocab_size} < {256 + n_special} (bytes + special tokens)")
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []
    n_merges = vocab_size - 256 - n_special

    words: dict[tuple[str, ...], int] = {}
    for w in _SPLIT.findall(_CORPUS):
        key = tuple(b2u[b] for b in w.encode("utf-8"))
        words[key] = words.get(key, 0) + 1
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for a, b in itertools.pairwise(w):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merged = a + b
        merges.append(f"{a} {b}")
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        new_words: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    # fill: extend existing tokens by one printable character, shortest tokens first
    alphabet = [b2u[b] for b in range(ord("a"), ord("z") + 1)] + [b2u[b] for b in b" etaoinsrhl"]
    alphabet = list(dict.fromkeys(alphabet)) + [
        b2u[b] for b in range(256) if b2u[b] not in alphabet
    ]
    frontier = 0
    while len(tokens) < vocab_size - n_special:
        base = tokens[frontier]
        frontier += 1
        if " " in base:
            continue
        for ch in alphabet:
            if len(tokens) >= vocab_size - n_special:
                break
            cand = base + ch
            if cand not in known:
                known.add(cand)
                tokens.append(cand)
                merges.append(f"{base} {ch}")
    types = [1] * len(tokens) + [3] * n_special
    tokens += list(SPECIAL_TOKENS)
    assert len(tokens) == vocab_size == len(types)
    return tokens, merges, types


# ---------------------------------------------------------------------------
# weights


def _rng(r: Recipe, t: TensorPlan, slab: int = 0) -> np.random.Generator:
    return np.random.default_rng([r.seed, t.index, slab])


def llama3_rope_factors(
    head_dim: int, theta: float, scaling: tuple[float, float, float, int]
) -> np.ndarray:
    """The rope_freqs.weight llama.cpp's converter writes for rope_type "llama3"
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors): 1 for high
    frequencies, ``factor`` for low ones, a smooth blend in between."""
    factor, low_freq_factor, high_freq_factor, old_context = scaling
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1.0)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _values(r: Recipe, t: TensorPlan, rows: int, slab: int) -> np.ndarray:
    if t.kind == "rope_freqs":
        assert r.llama3_rope is not None
        return llama3_rope_factors(r.head_dim, r.rope_theta, r.llama3_rope)
    rng = _rng(r, t, slab)
    cols = t.shape[-1]
    if t.kind == "norm":  # RMSNorm gains near 1: the forward pass stays O(1)
        return (1.0 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    if t.kind == "bias":
        return (r.std * rng.standard_normal(cols)).astype(np.float32)
    return (r.std * rng.standard_normal((rows, cols))).astype(np.float32)


def _scale_spec(qtype: GGMLQuantizationType, std: float) -> list[tuple[int, float]]:
    """(byte offset of an f16 scale field, its value) per block for random-blocks weights.

    With the other block bytes uniformly random, these make the decoded values
    have standard deviation ``std`` and a mean near 0 (derivations inline).
    """
    if qtype == Q.Q4_K:
        # w = d*sc*q - dmin*m with q uniform 0..15; _random_blocks sets m = sc per sub-block
        # and dmin = 7.5 d, so w = d*sc*(q - 7.5): every sub-block has mean 0.
        # Var = d^2 E[sc^2] E[(q-7.5)^2] = d^2 * 1333.5 * 21.25 (sc uniform 0..63)
        d = std / np.sqrt(1333.5 * 21.25)
        return [(0, d), (2, 7.5 * d)]
    if qtype == Q.Q6_K:
        # w = d*sc*(q-32); sc int8 uniform (E sc^2 = 5461.5), q-32: E = -0.5, E^2 = 341.5
        return [(208, std / np.sqrt(5461.5 * 341.5))]
    if qtype == Q.Q8_0:
        return [(0, std / np.sqrt(5461.5))]  # w = d*int8
    if qtype == Q.Q5_0:
        return [(0, std / np.sqrt(85.5))]  # w = d*(q-16), q uniform 0..31: E^2 = 85.5
    if qtype == Q.Q4_0:
        return [(0, std / np.sqrt(21.5))]  # w = d*(q-8), q uniform 0..15: E^2 = 21.5
    raise ValueError(f"no random-block recipe for {qtype.name}")


def _random_blocks(r: Recipe, t: TensorPlan, rows: int, slab: int) -> np.ndarray:
    block, size = BLOCK[t.qtype]
    n_blocks = rows * (t.shape[-1] // block)
    rng = _rng(r, t, slab)
    # full 64-bit words: every byte uniform (an int64 draw in [0, 2**63) would leave top bits 0)
    top = np.iinfo(np.uint64).max
    raw = rng.integers(0, top, size=(n_blocks * size + 7) // 8, dtype=np.uint64, endpoint=True)
    blocks = raw.view(np.uint8)[: n_blocks * size].reshape(n_blocks, size)
    # per-block jitter of the scale in [0.75, 1.25): blocks differ like real ones do
    jitter = (0.75 + 0.5 * rng.random(n_blocks, dtype=np.float32)).astype(np.float32)
    if t.qtype != Q.Q4_K:
        # symmetric types decode d * (q - zero) with q uniform, whose mean is -0.5 d; real
        # encoders give d either sign (d = max / -nmax), and so do we: the mean cancels
        jitter *= np.where(rng.random(n_blocks) < 0.5, np.float32(-1), np.float32(1))
    if t.qtype == Q.Q4_K:
        # 6-bit sub-block scales with min == scale (see _scale_spec), packed as get_scale_min_k4 reads them
        ls = rng.integers(0, 64, size=(n_blocks, 8), dtype=np.uint8)
        lo, hi = ls[:, :4], ls[:, 4:]
        blocks[:, 4:8] = lo | ((hi >> 4) << 6)
        blocks[:, 8:12] = blocks[:, 4:8]
        blocks[:, 12:16] = (hi & 0x0F) | ((hi & 0x0F) << 4)
    for offs, value in _scale_spec(t.qtype, r.std):
        scale = (np.float32(value) * jitter).astype(np.float16)
        blocks[:, offs : offs + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _tensor_slabs(r: Recipe, t: TensorPlan) -> Iterator[np.ndarray]:
    """The tensor's bytes, in slabs of whole rows."""
    if len(t.shape) == 1:
        yield quantize(_values(r, t, 1, 0), t.qtype).reshape(-1)
        return
    n_rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    row_bytes = row_nbytes(t.qtype, t.shape[-1])
    # quantizing costs ~50 float temporaries per value: smaller slabs for that path
    per_slab = _SLAB_BYTES // (row_bytes if r.is_large else 4 * t.shape[-1] * 8)
    per_slab = max(1, per_slab)
    for slab, start in enumerate(range(0, n_rows, per_slab)):
        rows = min(per_slab, n_rows - start)
        if r.is_large and t.qtype not in (Q.F32, Q.F16):
            yield _random_blocks(r, t, rows, slab).reshape(-1)
        else:
            yield quantize(_values(r, t, rows, slab), t.qtype).reshape(-1)


# ---------------------------------------------------------------------------
# the file


def add_metadata(
    w: GGUFWriter, r: Recipe, tokens: list[str], merges: list[str], types: list[int]
) -> None:
    """Every metadata key of recipe ``r``'s file (tests that write altered files reuse it)."""
    w.add_name(f"synthetic {r.name}")
    w.add_type("model")
    w.add_description(
        f"Synthetic {r.arch} model written by q4k synth ({WRITER_VERSION}); weights are "
        f"{'random valid blocks' if r.is_large else 'seeded normal values, quantized'}. Not a trained model."
    )
    w.add_context_length(r.context)
    w.add_embedding_length(r.hidden)
    w.add_block_count(r.layers)
    w.add_feed_forward_length(r.ffn)
    w.add_head_count(r.heads)
    w.add_head_count_kv(r.kv_heads)
    w.add_rope_freq_base(r.rope_theta)
    w.add_layer_norm_rms_eps(r.rms_eps)
    w.add_rope_dimension_count(r.head_dim)
    if r.key_length is not None:
        w.add_key_length(r.key_length)
        w.add_value_length(r.key_length)
    if r.sliding_window is not None:
        w.add_sliding_window(r.sliding_window)
    w.add_vocab_size(r.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if r.arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot = tokens.index("<|endoftext|>")
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_pad_token_id(eot)
    w.add_add_bos_token(False)


def write_gguf(recipe: Recipe, path: str | Path, *, progress: bool = False) -> Path:
    """Write ``recipe`` to ``path`` tensor by tensor; returns the path."""
    path = Path(path)
    plan = plan_tensors(recipe)
    tokens, merges, types = build_vocab(recipe.vocab)
    w = GGUFWriter(path, recipe.arch)
    try:
        add_metadata(w, recipe, tokens, merges, types)
        for t in plan:
            # shape in torch order with a float dtype: the writer takes it as element counts
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        total = sum(t.nbytes for t in plan)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {recipe.name}")
        for t in plan:
            w.write_padding(fout, fout.tell())  # align the tensor's start
            written = 0
            for chunk in _tensor_slabs(recipe, t):
                chunk.tofile(fout)
                written += chunk.nbytes
                if bar is not None:
                    bar.update(chunk.nbytes)
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
            w.write_padding(fout, t.nbytes)
        if bar is not None:
            bar.close()
        w.flush()
    finally:
        w.close()
    return path


def recipe_with(name: str, **changes: object) -> Recipe:
    """A named recipe with some fields changed (e.g. ``weights="random-blocks"``)."""
    return replace(RECIPES[name], **changes)  # type: ignore[arg-type]
