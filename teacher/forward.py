"""The one forward pass shared by every teacher (gpt-fast style: short and readable).

Weights are reached only through a :class:`WeightOps`, by their GGUF tensor
names, so the dense torch backend (``DenseOps``, the legacy F32 teacher) and the
Q4K-native CUDA backend run this same code. Activations are float32 torch
tensors on the device the ops return them on; norms, RoPE and attention are
plain torch.

GGUF conventions this relies on (checked by parity with transformers loading
the same files, tests/test_forward_parity.py):

- llama.cpp's converter permutes llama Q/K rows so that RoPE rotates adjacent
  pairs; qwen2 and gemma3 are unpermuted and rotate the two head halves (NEOX).
- Gemma's RMSNorm multiplies by (1 + w); the converter stores w + 1, so every
  norm here is a plain ``x_hat * w``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from teacher.config import ModelConfig


@runtime_checkable
class WeightOps(Protocol):
    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] float32 (no bias)."""
        ...

    def embed(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """ids [M] int64 -> rows [M, K] float32."""
        ...

    def vector(self, name: str) -> torch.Tensor:
        """Small F32 tensors: norm weights, biases."""
        ...

    def has(self, name: str) -> bool: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(
    cfg: ModelConfig, theta: float, scale: float, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] for the given base and linear scale."""
    d = cfg.rope_dim
    # same float32 formula as transformers' default RoPE init, to keep parity tight
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    angles = (positions.float() / scale)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x [B, T, H, D]; rotates the first 2 * cos.shape[-1] dims of each head."""
    d = 2 * cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if style == "normal":  # adjacent pairs (2i, 2i + 1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:  # "neox": halves (i, i + d/2)
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _linear(ops: WeightOps, x: torch.Tensor, base: str) -> torch.Tensor:
    """ops.linear on ``base.weight`` plus ``base.bias`` where the file has one (qwen2 q/k/v)."""
    y = ops.linear(x, f"{base}.weight")
    if ops.has(f"{base}.bias"):
        y = y + ops.vector(f"{base}.bias")
    return y


def _attention(
    cfg: ModelConfig,
    ops: WeightOps,
    h: torch.Tensor,
    i: int,
    batch: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    local_mask: torch.Tensor | None,
) -> torch.Tensor:
    p, b, t = f"blk.{i}", batch, h.shape[0] // batch
    q = _linear(ops, h, f"{p}.attn_q").view(b, t, cfg.n_heads, cfg.head_dim)
    k = _linear(ops, h, f"{p}.attn_k").view(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = _linear(ops, h, f"{p}.attn_v").view(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, ops.vector(f"{p}.attn_q_norm.weight"), cfg.norm_eps)
        k = rms_norm(k, ops.vector(f"{p}.attn_k_norm.weight"), cfg.norm_eps)
    q = apply_rope(q, *rope, cfg.rope_style).transpose(1, 2)  # [B, H, T, D]
    k = apply_rope(k, *rope, cfg.rope_style).transpose(1, 2)
    v = v.transpose(1, 2)
    if cfg.n_kv_heads != cfg.n_heads:  # GQA: each KV head serves a group of query heads
        k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
        v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
    if local_mask is not None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=local_mask, scale=cfg.attn_scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attn_scale)
    o = o.transpose(1, 2).reshape(b * t, cfg.n_heads * cfg.head_dim)
    return ops.linear(o, f"{p}.attn_output.weight")


def _ffn(cfg: ModelConfig, ops: WeightOps, h: torch.Tensor, i: int) -> torch.Tensor:
    p = f"blk.{i}"
    gate = ops.linear(h, f"{p}.ffn_gate.weight")
    act = F.gelu(gate, approximate="tanh") if cfg.gelu_ffn else F.silu(gate)
    return ops.linear(act * ops.linear(h, f"{p}.ffn_up.weight"), f"{p}.ffn_down.weight")


def forward(cfg: ModelConfig, ops: WeightOps, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] int64 (already validated) -> logits [B, T, cfg.vocab_size] float32."""
    if ops.has("rope_freqs.weight"):
        # llama 3.x frequency factors: not needed by the supported models; refuse
        # rather than return plausible wrong logits
        raise NotImplementedError("rope_freqs.weight (llama3 RoPE scaling) is not supported")
    b, t = ids.shape
    x = ops.embed(ids.reshape(-1), "token_embd.weight")  # [B*T, hidden]
    if cfg.embed_scale != 1.0:
        # transformers rounds the scale to the weight dtype; in float32 that is a no-op
        x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype, device=x.device)
    pos = torch.arange(t, device=x.device)

    ropes: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}
    local_mask = None
    if cfg.sliding_window is not None and cfg.sliding_window < t:
        # True = may attend: causal, and at most sliding_window tokens back (self included)
        dist = pos[:, None] - pos[None, :]
        local_mask = (dist >= 0) & (dist < cfg.sliding_window)

    for i in range(cfg.n_layers):
        key = (cfg.layer_rope_theta(i), cfg.layer_rope_scale(i))
        if key not in ropes:
            ropes[key] = rope_tables(cfg, key[0], key[1], pos)
        mask = local_mask if cfg.is_sliding(i) else None

        h = rms_norm(x, ops.vector(f"blk.{i}.attn_norm.weight"), cfg.norm_eps)
        h = _attention(cfg, ops, h, i, b, ropes[key], mask)
        if cfg.sandwich_norms:
            h = rms_norm(h, ops.vector(f"blk.{i}.post_attention_norm.weight"), cfg.norm_eps)
        x = x + h

        h = rms_norm(x, ops.vector(f"blk.{i}.ffn_norm.weight"), cfg.norm_eps)
        h = _ffn(cfg, ops, h, i)
        if cfg.sandwich_norms:
            h = rms_norm(h, ops.vector(f"blk.{i}.post_ffw_norm.weight"), cfg.norm_eps)
        x = x + h

    x = rms_norm(x, ops.vector("output_norm.weight"), cfg.norm_eps)
    tied = cfg.tied_embeddings if cfg.tied_embeddings is not None else not ops.has("output.weight")
    head = "token_embd.weight" if tied else "output.weight"  # tied: the lm_head is the embedding
    return ops.linear(x, head).view(b, t, -1)
