"""What a GGUF file is and whether the teacher can serve it, before any GPU work.

:func:`inspect_gguf` reads only the header and tensor table (plus, when asked,
the file once for its sha256): architecture and dims, bytes per quant type and
whether the native CUDA kernels serve each type, the predicted GPU memory of
the Q4K-native teacher against the F32-dequant path, the tokenizer, and every
reason the teacher would refuse the file (naming the file, the tensor and the
type or the metadata key). ``q4k inspect`` prints it; ``q4k falsify --teacher``
puts the same facts in the report.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teacher.config import ARCHS, ConfigError, config_from_metadata
from teacher.gguf_file import SUPPORTED_TYPES, GGUFModel, open_gguf

__all__ = ["FileReport", "TypeBytes", "file_sha256", "inspect_gguf"]

# Small tensors the Q4K teacher keeps as F32 on the GPU (norms, biases, rope_freqs);
# a 2-D tensor of a type without a kernel is refused instead (q4k_teacher._small_f32)
_SMALL_F32_MAX = 1 << 20


def _kernel_types() -> frozenset[Any]:
    from cupy_kernels.launch import SUPPORTED  # host data only: no CuPy import

    return SUPPORTED


@dataclass(frozen=True)
class TypeBytes:
    qtype: str
    tensors: int
    elements: int
    bytes: int
    teacher_loads: bool  # the file reader accepts the type
    native_kernel: bool  # 2-D weights of this type stay quantized on the GPU


@dataclass
class FileReport:
    path: str
    size_bytes: int
    sha256: str | None
    architecture: str
    parameters: int
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    hidden: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    vocab: int | None = None
    context: int | None = None
    rope: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    types: list[TypeBytes] = field(default_factory=list)
    q4k_gpu_bytes: int = 0  # weights as the Q4K teacher holds them
    f32_gpu_bytes: int = 0  # every tensor dequantized to F32 (the legacy path)
    tokenizer: str | None = None  # tokenizer.ggml.model, None when the file has none
    tokenizer_tokens: int = 0
    refusals: list[str] = field(default_factory=list)

    @property
    def servable(self) -> bool:
        return not self.refusals

    @property
    def quant_mix(self) -> str:
        """'Q4_K 78.1%, Q6_K 19.0%, ...' by bytes, largest first."""
        total = sum(t.bytes for t in self.types) or 1
        ordered = sorted(self.types, key=lambda t: -t.bytes)
        return ", ".join(f"{t.qtype} {100 * t.bytes / total:.1f}%" for t in ordered)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["servable"] = self.servable
        out["quant_mix"] = self.quant_mix
        return out


def file_sha256(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tokenizer(model: GGUFModel) -> tuple[str | None, int]:
    kind = model.metadata.get("tokenizer.ggml.model")
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    n = len(tokens) if isinstance(tokens, list | tuple | np.ndarray) else 0
    return (str(kind) if kind is not None else None), n


def _missing_tensors(model: GGUFModel, arch: str, n_layers: int) -> list[str]:
    spec = ARCHS[arch]
    need = ["token_embd.weight", "output_norm.weight"]
    need += [f"blk.{i}.{t}" for i in range(n_layers) for t in spec.layer_tensors()]
    return [n for n in need if n not in model.tensors]


def inspect_gguf(path: str | Path, *, sha256: bool = True) -> FileReport:
    """Everything ``q4k inspect`` prints; raises GGUFError only for a malformed file."""
    p = Path(path)
    model = open_gguf(p, strict=False)
    kernels = _kernel_types()
    arch = model.architecture
    report = FileReport(
        path=str(p.resolve()),
        size_bytes=p.stat().st_size,
        sha256=file_sha256(p) if sha256 else None,
        architecture=arch,
        parameters=sum(t.n_elements for t in model.tensors.values()),
    )

    per: dict[Any, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, rec in model.tensors.items():
        acc = per[rec.qtype]
        acc[0] += 1
        acc[1] += rec.n_elements
        acc[2] += rec.nbytes
        report.f32_gpu_bytes += 4 * rec.n_elements
        if rec.qtype not in SUPPORTED_TYPES:
            report.refusals.append(
                f"{p}: tensor '{name}' has type {rec.qtype.name}, which the teacher does not "
                f"decode (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
            )
        elif len(rec.shape) == 2 and rec.qtype in kernels:
            report.q4k_gpu_bytes += rec.nbytes
        elif len(rec.shape) == 2 and rec.n_elements > _SMALL_F32_MAX:
            report.refusals.append(
                f"{p}: tensor '{name}' ({rec.qtype.name}, shape {rec.shape}) has no CUDA "
                "kernel and is too large to hold as F32 in a Q4K-native teacher"
            )
        else:
            report.q4k_gpu_bytes += 4 * rec.n_elements
    report.types = [
        TypeBytes(q.name, n, e, b, q in SUPPORTED_TYPES, q in kernels)
        for q, (n, e, b) in sorted(per.items(), key=lambda kv: -kv[1][2])
    ]
    report.tokenizer, report.tokenizer_tokens = _tokenizer(model)

    try:
        cfg = config_from_metadata(model.metadata, p, model.tensors)
    except ConfigError as exc:
        report.refusals.append(str(exc))
        return report
    report.layers, report.heads, report.kv_heads = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    report.hidden, report.head_dim, report.ffn = cfg.hidden, cfg.head_dim, cfg.ffn
    report.vocab, report.context, report.sliding_window = cfg.vocab_size, cfg.context, cfg.sliding_window
    report.rope = {
        "style": cfg.rope_style, "theta": cfg.rope_theta, "dims": cfg.rope_dim,
        "linear_scale": cfg.rope_scale, "llama3_freq_factors": "rope_freqs.weight" in model.tensors,
    }  # fmt: skip
    freqs = model.tensors.get("rope_freqs.weight")
    if freqs is not None and not cfg.spec.rope_freq_factors:
        report.refusals.append(f"{p}: tensor 'rope_freqs.weight' in a {arch} file (only llama has one)")
    elif freqs is not None and freqs.shape != (cfg.rope_dim // 2,):
        report.refusals.append(
            f"{p}: tensor 'rope_freqs.weight' has shape {freqs.shape}; RoPE over {cfg.rope_dim} "
            f"dims needs {cfg.rope_dim // 2} factors"
        )
    missing = _missing_tensors(model, arch, cfg.n_layers)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        report.refusals.append(
            f"{p}: {arch} needs tensors the file lacks: {', '.join(missing[:5])}{more}"
        )
    return report


def render_text(r: FileReport) -> str:
    """The human-readable form ``q4k inspect`` prints."""
    gib = 2**30
    lines = [
        f"file          {r.path}",
        f"size          {r.size_bytes} bytes ({r.size_bytes / gib:.3f} GiB)",
        f"sha256        {r.sha256 or '(not computed)'}",
        f"architecture  {r.architecture}",
        f"parameters    {r.parameters} ({r.parameters / 1e9:.3f} B)",
    ]
    if r.layers is not None:
        lines += [
            f"layers        {r.layers}",
            f"heads         {r.heads} (kv {r.kv_heads}, head dim {r.head_dim})",
            f"hidden / ffn  {r.hidden} / {r.ffn}",
            f"vocab         {r.vocab}",
            f"context       {r.context}",
            "rope          " + ", ".join(f"{k} {v}" for k, v in r.rope.items()),
            f"sliding win.  {r.sliding_window if r.sliding_window is not None else 'none'}",
        ]
    lines.append("tensor bytes by type (loads: the teacher reads it; kernel: stays quantized on the GPU)")
    for t in r.types:
        lines.append(
            f"  {t.qtype:8s} {t.tensors:5d} tensors {t.bytes:>14d} bytes  "
            f"loads {'yes' if t.teacher_loads else 'NO '}  kernel {'yes' if t.native_kernel else 'no'}"
        )
    lines.append(f"quant mix     {r.quant_mix}")
    ratio = r.f32_gpu_bytes / r.q4k_gpu_bytes if r.q4k_gpu_bytes else float("nan")
    lines += [
        f"GPU weights   Q4K teacher {r.q4k_gpu_bytes / 1e9:.3f} GB, F32 path "
        f"{r.f32_gpu_bytes / 1e9:.3f} GB ({ratio:.2f}x; weights only, GB = 1e9 bytes)",
        f"tokenizer     {f'{r.tokenizer} ({r.tokenizer_tokens} tokens)' if r.tokenizer else 'none'}",
    ]
    if r.refusals:
        lines.append("REFUSED: the teacher cannot serve this file:")
        lines += [f"  - {why}" for why in r.refusals]
    else:
        lines.append("servable      yes")
    return "\n".join(lines)
