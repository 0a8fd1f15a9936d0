"""Model configuration read from GGUF metadata (``llama``, ``qwen2``, ``gemma3``).

The GGUF keys are the ones llama.cpp's converter writes (``<arch>.block_count``
etc.); what is *not* in the file (Gemma 3's local RoPE base, its sliding-window
pattern, its query scale) follows llama.cpp and transformers, which agree on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")

RopeStyle = Literal["normal", "neox"]


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
    # llama.cpp permutes llama's Q/K rows at conversion, so a GGUF llama rotates
    # adjacent pairs ("normal"); qwen2 and gemma3 are stored unpermuted and rotate
    # the two halves of a head ("neox").
    rope_style: RopeStyle
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
    sliding_window: int | None = None  # tokens a local layer sees, itself included
    sliding_window_pattern: int = 0  # every n-th layer is global; 0 -> no sliding layers
    gelu_ffn: bool = False  # GeGLU (gelu tanh) instead of SwiGLU
    sandwich_norms: bool = False  # post-attention and post-FFN norms
    qk_norm: bool = False  # RMSNorm on each head of q and k

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` uses local (sliding-window) attention."""
        if self.sliding_window is None or self.sliding_window_pattern <= 0:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0

    def layer_rope_theta(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_theta_local is not None:
            return self.rope_theta_local
        return self.rope_theta

    def layer_rope_scale(self, layer: int) -> float:
        # Gemma 3 scales only its global layers (llama.cpp: freq_scale_swa = 1)
        return 1.0 if self.is_sliding(layer) else self.rope_scale

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

    common: dict[str, Any] = dict(
        arch=arch,
        vocab_size=vocab,
        hidden=hidden,
        n_layers=get_int(f"{a}block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=get_int(f"{a}feed_forward_length"),
        context=get_int(f"{a}context_length"),
        rope_theta=get_float(f"{a}rope.freq_base", 10000.0),
        rope_dim=rope_dim,
        rope_style="normal" if arch == "llama" else "neox",
        rope_scale=rope_scale,
        norm_eps=get_float(f"{a}attention.layer_norm_rms_epsilon"),
        tied_embeddings=tied,
        qkv_bias=arch == "qwen2",
    )
    if arch != "gemma3":
        return ModelConfig(**common)

    n_layers = common["n_layers"]
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): query_pre_attn_scalar is the head
    # dim for every size except 27B (62 layers), where it is hidden / heads.
    query_pre_attn_scalar = hidden / n_heads if n_layers == 62 else head_dim
    return ModelConfig(
        **common,
        embed_scale=math.sqrt(hidden),
        query_scale=1.0 / math.sqrt(query_pre_attn_scalar),
        # not stored in GGUF: both llama.cpp and transformers hard-code 10000 and 6
        rope_theta_local=10000.0,
        sliding_window=get_int(f"{a}attention.sliding_window"),
        sliding_window_pattern=6,
        gelu_ffn=True,
        sandwich_norms=True,
        qk_norm=True,
    )
