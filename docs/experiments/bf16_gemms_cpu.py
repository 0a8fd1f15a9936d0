"""Which layer GEMMs could run in bf16 under the Q4K teacher's f16 activations? (session 16)

On the H200 the f16 GEMMs run ~4 % lower power-capped clocks than bf16 ones, and the
2,048-token shapes sit at 0.894-0.895 of dense (target 0.9). bf16 everywhere took
FT-Q4K-TEACHER-003 below 0.999, so the question was whether a subset (the FFN: 87 % of a
7B layer's weights) would hold. This answers it on the CPU, before spending GPU time, by
emulating the decode + cuBLAS path: for each linear, x and the decoded weight rounded to
the GEMM's dtype, float32 sums, the output rounded to it (bf16 outputs stay bf16 through
the FFN's elementwise work); everything else is the shared forward with f16 activations
and the lm_head in bf16, as the teacher runs it. Min over rows of the cosine against the
F32 forward, FT-003's measure, on random ids.

    python3 docs/experiments/bf16_gemms_cpu.py OUT.json MODEL [MODEL ...]

MODEL: a name `teacher.models` resolves (gemma3-270m, smollm2-135m, tiny, ...).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from falsifiers._common import random_ids
from teacher.dequant_teacher import DenseOps, DequantTeacher
from teacher.forward import HEAD_NAMES, forward
from teacher.models import resolve_model

# name fragments of the linears whose GEMM runs in bf16
VARIANTS: dict[str, tuple[str, ...]] = {
    "f16 (the teacher today)": (),
    "ffn gate, up, down in bf16": ("ffn_",),
    "ffn down in bf16": ("ffn_down",),
    "ffn gate, up in bf16": ("ffn_gate", "ffn_up"),
    "every layer GEMM in bf16": ("ffn_", "attn_"),
}


class EmulatedOps:
    """WeightOps over an F32 DenseOps that rounds each GEMM's operands as the GPU path does."""

    def __init__(self, f32: DenseOps, bf16_parts: tuple[str, ...]) -> None:
        self.f32, self.parts, self.dtype = f32, bf16_parts, torch.float16
        self._rounded: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _gemm_dtype(self, name: str) -> torch.dtype:
        bf16 = name in HEAD_NAMES or any(p in name for p in self.parts)
        return torch.bfloat16 if bf16 else torch.float16

    def linear(self, x: torch.Tensor, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        gd = self._gemm_dtype(name)
        if (name, gd) not in self._rounded:
            self._rounded[name, gd] = self.f32._get(name).to(gd).float()
        y = x.to(gd).float() @ self._rounded[name, gd].T
        if out is not None:
            return out.copy_(y)
        return y.to(self.dtype if name in HEAD_NAMES else gd)

    def embed(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        return self.f32.embed(ids, name).to(self.dtype)

    def vector(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.f32.vector(name, dtype)

    def has(self, name: str) -> bool:
        return self.f32.has(name)

    def set_activation_dtype(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def min_cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.double().flatten(0, -2), want.double().flatten(0, -2)
    return float(torch.nn.functional.cosine_similarity(g, w, dim=-1).min())


def measure(model: str, batch: int = 2, seq: int = 96) -> dict[str, Any]:
    path = resolve_model(model)
    ref = DequantTeacher.from_gguf(path, device="cpu")
    ids = random_ids(ref.vocab_size(), (batch, seq), seed=3)
    t0 = time.perf_counter()
    with torch.no_grad():
        want = forward(ref.cfg, ref.ops, ids)
        row: dict[str, Any] = {"file": path.name, "ids": [batch, seq]}
        for label, parts in VARIANTS.items():
            got = forward(ref.cfg, EmulatedOps(ref.ops, parts), ids)
            row[label] = {"min_cosine": min_cosine(got, want), "finite": bool(torch.isfinite(got).all())}
            print(f"{model}: {label}: min cosine {row[label]['min_cosine']:.6f}", flush=True)
    row["seconds"] = time.perf_counter() - t0
    return row


def main(out: str, models: list[str]) -> None:
    res = {"what": __doc__.split("\n")[0], "threshold_ft003": 0.999,
           "models": {m: measure(m) for m in models}}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
