"""Model configuration read from GGUF metadata (``llama``, ``qwen2``, ``qwen3``, ``gemma3``).

The GGUF keys are the ones llama.cpp's converter writes (``<arch>.block_count``
etc.); what is *not* in the file (Gemma 3's local RoPE base, its sliding-window
pattern, its query scale) follows llama.cpp and transformers, which agree on it.

What differs between architectures is data, in one place: :data:`ARCHS` (one
:class:`ArchSpec` per ``general.architecture``). The forward pass, the synthetic
writer, ``q4k inspect`` and the consistency rules all read it, so adding an
architecture is one row here plus whatever genuinely new computation it needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

RopeStyle = Literal["normal", "neox"]


@dataclass(frozen=True)
class ArchSpec:
    """How one ``general.architecture`` differs from a plain llama block."""

    name: str
    # llama.cpp permutes llama's Q/K rows at conversion, so a GGUF llama rotates
    # adjacent pairs ("normal"); the others are stored unpermuted and rotate the
    # two halves of a head ("neox").
    rope_style: RopeStyle
    qkv_bias: bool = False  # q/k/v projections carry biases (qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k (qwen3, gemma3)
    sandwich_norms: bool = False  # post-attention and post-FFN norms (gemma3)
    gelu_ffn: bool = False  # GeGLU (gelu tanh) instead of SwiGLU (gemma3)
    scaled_embeddings: bool = False  # token embeddings times sqrt(hidden) (gemma3)
    # may carry rope_freqs.weight: llama 3.x per-frequency RoPE factors
    rope_freq_factors: bool = False
    # <arch>.attention.sliding_window: "every" layer (mistral-style llama files, when
    # the key is present), "pattern" (gemma3: required, every 6th layer global) or "no"
    sliding_window: Literal["no", "every", "pattern"] = "no"

    def layer_tensors(self) -> tuple[str, ...]:
        """Tensor names (after ``blk.N.``) every layer of this architecture has."""
        names = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                 "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                 "ffn_down.weight"]  # fmt: skip
        if self.qkv_bias:
            names += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
        if self.qk_norm:
            names += ["attn_q_norm.weight", "attn_k_norm.weight"]
        if self.sandwich_norms:
            names += ["post_attention_norm.weight", "post_ffw_norm.weight"]
        return tuple(names)


#: Every architecture the forward pass runs, by its ``general.architecture``.
ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec("llama", "normal", rope_freq_factors=True, sliding_window="every"),
        ArchSpec("qwen2", "neox", qkv_bias=True),
        ArchSpec("qwen3", "neox", qk_norm=True),
        ArchSpec("gemma3", "neox", qk_norm=True, sandwich_norms=True, gelu_ffn=True,
                 scaled_embeddings=True, sliding_window="pattern"),
    )
}  # fmt: skip

SUPPORTED_ARCHS = tuple(ARCHS)


class ConfigError(ValueError):
    """GGUF metadata that does not describe a model we can run; names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int  # native vocab: rows of the lm_head (output.weight or the tied token_embd)
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    context: int
    rope_theta: float
    rope_dim: int  # rotated dims per head (<= head_dim)
    rope_style: RopeStyle  # see ArchSpec.rope_style
    rope_scale: float  # linear RoPE scaling factor (positions / rope_scale); 1.0 = none
    norm_eps: float
    # None when the caller did not say which tensors the file holds; forward() then
    # decides from the weights (no output.weight -> lm_head is token_embd).
    tied_embeddings: bool | None
    qkv_bias: bool  # qwen2: q/k/v projections carry biases
    # gemma3 only (neutral values elsewhere):
    embed_scale: float = 1.0  # token embeddings multiplied by sqrt(hidden)
    query_scale: float = 0.0  # attention scale; 0.0 -> 1/sqrt(head_dim)
    rope_theta_local: float | None = None  # RoPE base of the sliding-window layers
    # tokens a local layer sees, itself included; None: every layer is global
    sliding_window: int | None = None
    # with a window: every n-th layer is global (gemma3: 6); 0 -> every layer is local
    # (mistral-style llama files)
    sliding_window_pattern: int = 0
    gelu_ffn: bool = False  # GeGLU (gelu tanh) instead of SwiGLU
    sandwich_norms: bool = False  # post-attention and post-FFN norms
    qk_norm: bool = False  # RMSNorm on each head of q and k

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` uses local (sliding-window) attention."""
        if self.sliding_window is None:
            return False
        if self.sliding_window_pattern <= 0:
            return True
        return (layer + 1) % self.sliding_window_pattern != 0

    def layer_rope_theta(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_theta_local is not None:
            return self.rope_theta_local
        return self.rope_theta

    def layer_rope_scale(self, layer: int) -> float:
        # Gemma 3 scales only its global layers (llama.cpp: freq_scale_swa = 1); a
        # mistral-style llama, all of whose layers slide, keeps its scaling everywhere
        local = self.sliding_window_pattern > 0 and self.is_sliding(layer)
        return 1.0 if local else self.rope_scale

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    @property
    def attn_scale(self) -> float:
        return self.query_scale if self.query_scale > 0 else 1.0 / math.sqrt(self.head_dim)


def _scalar(value: Any) -> Any:
    """GGUF readers hand scalars as python values, numpy scalars or 1-element arrays."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8")
    return value


def config_from_metadata(
    metadata: Mapping[str, Any],
    path: str | Path,
    tensor_names: Iterable[str] | None = None,
) -> ModelConfig:
    """Build the config; ``tensor_names`` (optional) settles tied embeddings.

    Raises ConfigError naming ``path`` and the key that is missing or wrong.
    """
    where = str(path)

    def get(key: str, default: Any = ...) -> Any:
        if key not in metadata:
            if default is ...:
                raise ConfigError(f"{where}: GGUF metadata has no {key!r}")
            return default
        return _scalar(metadata[key])

    def get_int(key: str, default: Any = ...) -> int:
        value = get(key, default)
        # an inf or NaN float would escape int() as OverflowError / ValueError, unlocated
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: GGUF metadata {key!r} must be an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{where}: GGUF metadata {key!r} must be an integer, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{where}: GGUF metadata {key!r} must be positive, got {value!r}")
        return int(value)

    def get_float(key: str, default: Any = ...) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: GGUF metadata {key!r} must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"{where}: GGUF metadata {key!r} must be finite and positive, got {value!r}"
            )
        return float(value)

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"{where}: general.architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    a = f"{arch}."

    if f"{a}vocab_size" in metadata:
        vocab = get_int(f"{a}vocab_size")
    elif "tokenizer.ggml.tokens" in metadata:
        tokens = metadata["tokenizer.ggml.tokens"]
        if not isinstance(tokens, Sequence | np.ndarray) or isinstance(tokens, str | bytes):
            raise ConfigError(
                f"{where}: GGUF metadata 'tokenizer.ggml.tokens' is not a list of tokens"
            )
        vocab = len(tokens)
        if vocab == 0:
            raise ConfigError(f"{where}: GGUF metadata 'tokenizer.ggml.tokens' is empty")
    else:
        raise ConfigError(
            f"{where}: GGUF metadata has neither {a + 'vocab_size'!r} nor 'tokenizer.ggml.tokens'"
        )

    hidden = get_int(f"{a}embedding_length")
    n_heads = get_int(f"{a}attention.head_count")
    n_kv = get_int(f"{a}attention.head_count_kv", n_heads)
    if n_heads % n_kv:
        raise ConfigError(
            f"{where}: {a}attention.head_count {n_heads} is not a multiple of head_count_kv {n_kv}"
        )
    if f"{a}attention.key_length" in metadata:
        head_dim = get_int(f"{a}attention.key_length")
        v_len = get_int(f"{a}attention.value_length", head_dim)
        if v_len != head_dim:
            raise ConfigError(
                f"{where}: {a}attention.value_length {v_len} != key_length {head_dim} is not supported"
            )
    else:
        if hidden % n_heads:
            raise ConfigError(
                f"{where}: {a}embedding_length {hidden} is not a multiple of head_count {n_heads} "
                f"and {a + 'attention.key_length'!r} is missing"
            )
        head_dim = hidden // n_heads
    rope_dim = get_int(f"{a}rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise ConfigError(
            f"{where}: {a}rope.dimension_count {rope_dim} must be even and <= head dim {head_dim}"
        )

    rope_scale = 1.0
    scaling = get(f"{a}rope.scaling.type", "none")
    if scaling == "linear":
        rope_scale = get_float(f"{a}rope.scaling.factor")
    elif scaling != "none":
        # silently ignoring yarn/longrope would give plausible but wrong logits
        raise ConfigError(
            f"{where}: {a}rope.scaling.type {scaling!r} is not supported (none, linear)"
        )

    tied: bool | None = None
    if tensor_names is not None:
        tied = "output.weight" not in set(tensor_names)

    spec = ARCHS[arch]
    n_layers = get_int(f"{a}block_count")
    common: dict[str, Any] = dict(
        arch=arch,
        vocab_size=vocab,
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=get_int(f"{a}feed_forward_length"),
        context=get_int(f"{a}context_length"),
        rope_theta=get_float(f"{a}rope.freq_base", 10000.0),
        rope_dim=rope_dim,
        rope_style=spec.rope_style,
        rope_scale=rope_scale,
        norm_eps=get_float(f"{a}attention.layer_norm_rms_epsilon"),
        tied_embeddings=tied,
        qkv_bias=spec.qkv_bias,
        gelu_ffn=spec.gelu_ffn,
        sandwich_norms=spec.sandwich_norms,
        qk_norm=spec.qk_norm,
    )
    if spec.sliding_window == "every" and f"{a}attention.sliding_window" in metadata:
        # mistral-style llama file: every layer attends to the last `window` tokens
        common.update(sliding_window=get_int(f"{a}attention.sliding_window"),
                      sliding_window_pattern=0)  # fmt: skip
    if arch != "gemma3":
        return ModelConfig(**common)

    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): query_pre_attn_scalar is the head
    # dim for every size except 27B (62 layers), where it is hidden / heads.
    query_pre_attn_scalar = hidden / n_heads if n_layers == 62 else head_dim
    return ModelConfig(
        **common,
        embed_scale=math.sqrt(hidden) if spec.scaled_embeddings else 1.0,
        query_scale=1.0 / math.sqrt(query_pre_attn_scalar),
        # not stored in GGUF: both llama.cpp and transformers hard-code 10000 and 6
        rope_theta_local=10000.0,
        sliding_window=get_int(f"{a}attention.sliding_window"),
        sliding_window_pattern=6,
    )
