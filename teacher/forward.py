"""The one forward pass shared by every teacher (gpt-fast style: short and readable).

Weights are reached only through a :class:`WeightOps`, by their GGUF tensor
names, so the dense torch backend (``DenseOps``, the legacy F32 teacher and the
dense-bf16 baseline) and the Q4K-native CUDA backend run this same code.
Activations are torch tensors of ``ops.dtype`` (float32 for the reference,
float16 for the Q4K teacher, bfloat16 for the dense bf16 baseline) on the ops'
device; the residual stream and norms accumulate in float32 whatever that dtype
is, attention is torch's SDPA (flash or cuDNN kernels for f16 / bf16 on a GPU),
and the logits come out in the dtype the caller asks for (float32 by default).

Profiling: each stage runs inside a ``torch.profiler.record_function`` range
named by :data:`STAGES` (matmuls are labelled by the ops, see
:func:`matmul_label`), so ``q4k bench teacher --profile`` can split GPU time by
stage; outside a profiler a range costs about a microsecond of host time and
nothing on the GPU.

GGUF conventions this relies on (checked by parity with transformers loading
the same files, tests/test_forward_parity.py):

- llama.cpp's converter permutes llama Q/K rows so that RoPE rotates adjacent
  pairs; qwen2, qwen3 and gemma3 are unpermuted and rotate the two head halves (NEOX).
- llama 3.x files carry ``rope_freqs.weight``: one factor per rotated pair that
  divides that pair's frequency (llama.cpp's ``freq_factors``), which is how the
  converter stores transformers' "llama3" RoPE scaling.
- Gemma's RMSNorm multiplies by (1 + w); the converter stores w + 1, so every
  norm here is a plain ``x_hat * w``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from teacher.config import ModelConfig

# profiler ranges of the forward (the matmuls add "matmul:<path>" and "lm_head")
STAGES = ("embedding", "norm", "attention", "elementwise")
HEAD_NAMES = ("output.weight", "token_embd.weight")


def matmul_label(name: str, path: str) -> str:
    """The profiler range of one linear: the lm_head apart, other matmuls by kernel path."""
    return "lm_head" if name in HEAD_NAMES else f"matmul:{path}"


@runtime_checkable
class WeightOps(Protocol):
    dtype: torch.dtype  # activation dtype of this backend

    def linear(self, x: torch.Tensor, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] (no bias): a new tensor of ``dtype``, or written
        into ``out`` (any float dtype: the lm_head writes float32 logits this way)."""
        ...

    def embed(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """ids [M] int64 (already validated) -> rows [M, K] of ``dtype``."""
        ...

    def vector(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Small F32 tensors (norm weights, biases): as stored, or cast to ``dtype`` (see
        :func:`cast_once`)."""
        ...

    def has(self, name: str) -> bool: ...

    def set_activation_dtype(self, dtype: torch.dtype) -> None:
        """Run later forwards with ``dtype`` activations (the f16-overflow fallback)."""
        ...


def cast_once(
    cache: dict[tuple[str, torch.dtype], torch.Tensor], name: str, v: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """``v`` (the tensor ``name``) in ``dtype`` (None: as it is), cast at the first call and
    kept in ``cache``: a bias is added at every forward, and its cast is a kernel of its own."""
    if dtype is None or v.dtype == dtype:
        return v
    if (name, dtype) not in cache:
        cache[name, dtype] = v.to(dtype)
    return cache[name, dtype]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """RMSNorm accumulated in float32 (as transformers does for bf16 models); the result
    in ``dtype`` (default: x's).

    On a GPU this is torch's fused kernel (``F.rms_norm``: the same float32 formula in one
    pass over x, then the cast): the textbook form below is six kernels, and at 512 tokens
    of a 7B each costs about what a graphed launch does. Only the order of the sum of
    squares differs, so the two agree to float32 rounding (tests/gpu check it); the CPU
    keeps the textbook form, bit for bit as transformers computes it."""
    xf = x.float()
    if xf.is_cuda:
        y = F.rms_norm(xf, (xf.shape[-1],), weight, eps)
    else:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight
    return y.to(dtype or x.dtype)


ROPE_FREQS = "rope_freqs.weight"


def rope_tables(
    cfg: ModelConfig,
    theta: float,
    scale: float,
    positions: torch.Tensor,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] for the given base and linear scale; ``freq_factors``
    [rope_dim / 2] (llama 3.x ``rope_freqs.weight``) divide the frequencies."""
    d = cfg.rope_dim
    # same float32 formula as transformers' default RoPE init, to keep parity tight
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    if freq_factors is not None:
        if freq_factors.shape != inv_freq.shape:
            raise ValueError(
                f"{ROPE_FREQS} has shape {tuple(freq_factors.shape)}; RoPE over {d} dims "
                f"needs {d // 2} factors"
            )
        inv_freq = inv_freq / freq_factors.to(inv_freq.device, torch.float32)
    angles = (positions.float() / scale)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


class RopeTables(NamedTuple):
    """cos and signed sin [1, T, 1, rope_dim] in the activation dtype, laid out like the
    rotated dims of a head (see :func:`rope_for`)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_for(cos: torch.Tensor, sin: torch.Tensor, style: str, dtype: torch.dtype) -> RopeTables:
    """:func:`rope_tables`' [T, rope_dim / 2] tables spread over the rotated dims the way
    :func:`apply_rope` pairs them, with the rotation's minus sign folded into the sine
    (exact: only a sign flips), in ``dtype`` (as transformers applies them to a bf16
    model). Built once a forward, not once a call: each call then costs four kernels."""
    c, s = cos.to(dtype), sin.to(dtype)
    if style == "normal":  # adjacent pairs (2i, 2i + 1)
        c2, s2 = torch.stack((c, c), dim=-1).flatten(-2), torch.stack((-s, s), dim=-1).flatten(-2)
    else:  # "neox": halves (i, i + d/2)
        c2, s2 = torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1)
    return RopeTables(c2[None, :, None, :], s2[None, :, None, :])


def swap_pairs(rot: torch.Tensor, style: str) -> torch.Tensor:
    """The rotated dims with each RoPE pair's two members exchanged: adjacent dims (2i, 2i + 1)
    for "normal", the two halves (i, i + d/2) for "neox"."""
    if style == "normal":
        return rot.unflatten(-1, (rot.shape[-1] // 2, 2)).flip(-1).flatten(-2)
    d = rot.shape[-1]
    return torch.cat((rot[..., d // 2 :], rot[..., : d // 2]), dim=-1)


def apply_rope(x: torch.Tensor, rope: RopeTables, style: str) -> torch.Tensor:
    """x [B, T, H, D]; rotates the first rope_dim dims of each head: x * cos + swap(x) * sin,
    where swap exchanges each pair's two members. Each product is rounded on its own and
    then added, as in x1 cos - x2 sin, so the result is bit-identical to the textbook form
    (an addcmul, which rounds once, is not: FT-Q4K-TEACHER-006 moved with that rounding,
    docs/experiments/ft006_rounding.py)."""
    d = rope.cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    # .to: a no-op but where a caller rotates another dtype than the forward's
    out = (rot * rope.cos.to(x.dtype)).add_(swap_pairs(rot, style) * rope.sin.to(x.dtype))
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _linear(ops: WeightOps, x: torch.Tensor, base: str) -> torch.Tensor:
    """ops.linear on ``base.weight`` plus ``base.bias`` where the file has one (qwen2 q/k/v)."""
    y = ops.linear(x, f"{base}.weight")
    if ops.has(f"{base}.bias"):
        with record_function("elementwise"):
            y = y + ops.vector(f"{base}.bias", y.dtype)
    return y


def _attention(
    cfg: ModelConfig,
    ops: WeightOps,
    h: torch.Tensor,
    i: int,
    batch: int,
    rope: RopeTables,
    local_mask: torch.Tensor | None,
) -> torch.Tensor:
    p, b, t = f"blk.{i}", batch, h.shape[0] // batch
    q = _linear(ops, h, f"{p}.attn_q").view(b, t, cfg.n_heads, cfg.head_dim)
    k = _linear(ops, h, f"{p}.attn_k").view(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = _linear(ops, h, f"{p}.attn_v").view(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        with record_function("norm"):
            q = rms_norm(q, ops.vector(f"{p}.attn_q_norm.weight"), cfg.norm_eps)
            k = rms_norm(k, ops.vector(f"{p}.attn_k_norm.weight"), cfg.norm_eps)
    with record_function("attention"):
        q = apply_rope(q, rope, cfg.rope_style).transpose(1, 2)  # [B, H, T, D]
        k = apply_rope(k, rope, cfg.rope_style).transpose(1, 2)
        v = v.transpose(1, 2)
        if local_mask is not None:
            if cfg.n_kv_heads != cfg.n_heads:  # GQA: each KV head serves a group of query heads
                # copied out: with a mask, SDPA's flash kernel is out and the
                # memory-efficient one takes no grouped heads
                k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
                v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=local_mask, scale=cfg.attn_scale)
        else:  # the flash kernel reads a group's KV head in place (no copies)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attn_scale,
                                               enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        o = o.transpose(1, 2).reshape(b * t, cfg.n_heads * cfg.head_dim)
    return ops.linear(o, f"{p}.attn_output.weight")


def _ffn(cfg: ModelConfig, ops: WeightOps, h: torch.Tensor, i: int) -> torch.Tensor:
    p = f"blk.{i}"
    gate = ops.linear(h, f"{p}.ffn_gate.weight")
    up = ops.linear(h, f"{p}.ffn_up.weight")
    with record_function("elementwise"):
        # in place where the op allows: at 4096 tokens of a 7B each [M, ffn] tensor is
        # 155 MB, and the frozen forward never needs gate again (same values either way)
        act = F.gelu(gate, approximate="tanh") if cfg.gelu_ffn else F.silu(gate, inplace=True)
        act.mul_(up)
    del gate, up
    return ops.linear(act, f"{p}.ffn_down.weight")


def _residual(cfg: ModelConfig, ops: WeightOps, x: torch.Tensor, h: torch.Tensor, post_norm: str) -> torch.Tensor:
    """x + h, with gemma's sandwich norm on h first."""
    if cfg.sandwich_norms:
        with record_function("norm"):
            h = rms_norm(h, ops.vector(post_norm), cfg.norm_eps)
    with record_function("elementwise"):
        return x.add_(h)  # float32 residual += h of ops.dtype, in place (no one else holds x)


def hidden_states(cfg: ModelConfig, ops: WeightOps, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] int64 (already validated, on the ops' device) -> the final-normed
    hidden states [B*T, hidden] of ``ops.dtype``: everything but the lm_head, so a
    caller can run the head in chunks (see :func:`head_logits`)."""
    factors = None
    if ops.has(ROPE_FREQS):
        if not cfg.spec.rope_freq_factors:
            # a factor table where the architecture has none: refuse rather than guess
            raise ValueError(f"{ROPE_FREQS} in a {cfg.arch} file: only llama files may carry one")
        factors = ops.vector(ROPE_FREQS)
    b, t = ids.shape
    with record_function("embedding"):
        x = ops.embed(ids.reshape(-1), "token_embd.weight")  # [B*T, hidden]
        if cfg.embed_scale != 1.0:
            # transformers rounds the scale to the activation dtype (a no-op in float32)
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype, device=x.device)
        # the residual stream accumulates every layer's output: it stays float32 (a
        # [tokens, hidden] tensor, small next to the matmuls), the matmuls see ops.dtype
        x = x.float()
    pos = torch.arange(t, device=x.device)

    ropes: dict[tuple[float, float], RopeTables] = {}
    local_mask = None
    if cfg.sliding_window is not None and cfg.sliding_window < t:
        # True = may attend: causal, and at most sliding_window tokens back (self included)
        dist = pos[:, None] - pos[None, :]
        local_mask = (dist >= 0) & (dist < cfg.sliding_window)

    for i in range(cfg.n_layers):
        key = (cfg.layer_rope_theta(i), cfg.layer_rope_scale(i))
        if key not in ropes:
            ropes[key] = rope_for(*rope_tables(cfg, key[0], key[1], pos, factors), cfg.rope_style, ops.dtype)
        mask = local_mask if cfg.is_sliding(i) else None

        with record_function("norm"):
            h = rms_norm(x, ops.vector(f"blk.{i}.attn_norm.weight"), cfg.norm_eps, ops.dtype)
        h = _attention(cfg, ops, h, i, b, ropes[key], mask)
        x = _residual(cfg, ops, x, h, f"blk.{i}.post_attention_norm.weight")
        with record_function("norm"):
            h = rms_norm(x, ops.vector(f"blk.{i}.ffn_norm.weight"), cfg.norm_eps, ops.dtype)
        h = _ffn(cfg, ops, h, i)
        x = _residual(cfg, ops, x, h, f"blk.{i}.post_ffw_norm.weight")

    with record_function("norm"):
        return rms_norm(x, ops.vector("output_norm.weight"), cfg.norm_eps, ops.dtype)


def head_name(cfg: ModelConfig, ops: WeightOps) -> str:
    """The lm_head's tensor: output.weight, or the embedding where the model ties them."""
    tied = cfg.tied_embeddings if cfg.tied_embeddings is not None else not ops.has("output.weight")
    return "token_embd.weight" if tied else "output.weight"


def head_logits(
    cfg: ModelConfig, ops: WeightOps, hidden: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """hidden [M, hidden] -> logits [M, cfg.vocab_size]: of ``ops.dtype``, or into ``out``."""
    return ops.linear(hidden, head_name(cfg, ops), out=out)


def forward(
    cfg: ModelConfig, ops: WeightOps, ids: torch.Tensor, logits_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ids [B, T] int64 (already validated) -> logits [B, T, cfg.vocab_size] of ``logits_dtype``."""
    b, t = ids.shape
    h = hidden_states(cfg, ops, ids)
    out = None
    if logits_dtype != h.dtype:
        out = torch.empty((b * t, cfg.vocab_size), dtype=logits_dtype, device=h.device)
    return head_logits(cfg, ops, h, out).view(b, t, -1)


def matmul_into(
    x: torch.Tensor, weight_chunks: Iterable[tuple[int, torch.Tensor]], out: torch.Tensor
) -> torch.Tensor:
    """out[:, n0:n0+rows] = x @ chunk.T for each (n0, chunk [rows, K]) of W, in x's dtype.

    The weight backends share it: the dense one passes views of its weight, the
    Q4K one a scratch it decodes each chunk into. A GEMM writes its column slice
    of ``out`` in place where the dtypes agree (cuBLAS takes the row stride as
    its leading dimension), and where f16 / bf16 x meets float32 logits on a GPU
    (cuBLAS rounds its float32 sums straight into them); otherwise through a
    [M, rows] temporary."""
    widen = _gemm_widens(x, out)
    for n0, w in weight_chunks:
        dst = out[:, n0 : n0 + w.shape[0]]
        if out.dtype == x.dtype:
            torch.mm(x, w.T, out=dst)
        elif widen:
            # no [M, rows] temporary of x's dtype (183 MiB per head chunk at 4096 tokens)
            # and no cast pass over it; 4 % faster on the H200, and exact to float32
            torch.mm(x, w.T, out_dtype=out.dtype, out=dst)
        else:
            dst.copy_(x @ w.T)
    return out


_MM_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()  # torch >= 2.8 on CUDA


def _gemm_widens(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether cuBLAS can write f16 / bf16 x's product into ``out`` as float32 itself."""
    return (
        _MM_OUT_DTYPE and x.is_cuda and out.dtype == torch.float32
        and x.dtype in (torch.float16, torch.bfloat16)
    )
