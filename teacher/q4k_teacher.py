"""The Q4K-native frozen teacher: GGUF weights stay in their quantized blocks on the GPU.

Every 2-D weight is uploaded as the raw bytes of its GGUF tensor (streamed:
memory map -> pinned staging buffer -> device, double-buffered so the host copy
of one chunk overlaps the DMA of the previous). Matmuls and the embedding
lookup run the CuPy kernels of ``cupy_kernels`` directly on those bytes; the
shared forward pass (``teacher.forward``) does the rest in torch on the same
device. Only 1-D tensors (norms, biases) are held as F32.

Frozen by construction: no ``nn.Parameter`` anywhere, logits computed under
``torch.no_grad`` and detached, and the training entry points exist only to refuse:
they raise at run time and are marked ``@deprecated`` so mypy (with the
``deprecated`` error code on, as in this project) rejects code that calls them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch.profiler import record_function
from typing_extensions import deprecated

from teacher.config import ModelConfig
from teacher.consistency import check_model
from teacher.forward import HEAD_NAMES, cast_once, matmul_into, matmul_label
from teacher.gguf_file import GGUFModel, TensorRecord, open_gguf
from teacher.provider import effective_vocab
from teacher.quants import dequantize
from teacher.runtime import ForwardRunner, RunnerTeacher

log = logging.getLogger("teacher.q4k")

MIB = float(1 << 20)
# Activation dtypes the Q4K teacher runs. float16 is the default: its 10-bit
# mantissa keeps a 28-layer 7B forward within FT-003's cosine 0.999 of the F32
# reference, where bf16's 7 bits measured 0.9973 (and Gemma-3-270M 0.93 on CPU).
# f16's range is narrower: a forward whose hidden states come out non-finite is
# rerun in bfloat16 (ForwardRunner's fallback), with a warning.
ACTIVATION_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STAGING_CHUNK = 64 << 20  # bytes per pinned staging buffer (two of them)
ARENA_ALIGN = 256  # byte alignment of each weight in the one device buffer that holds them all


class FrozenTeacherError(RuntimeError):
    """Raised by every attempt to train a frozen teacher."""


@dataclass(frozen=True)
class DeviceWeight:
    """A weight kept on the GPU as the raw bytes of its GGUF tensor."""

    name: str
    qtype: QT
    n: int  # rows (output features)
    k: int  # row length (input features)
    data: Any  # cupy.ndarray, uint8, the file's bytes


# Byte ranges inside one block that hold packed quant values, per type: (block bytes, start, end).
# Swapping the two nibbles of those bytes is what a decoder that reads the nibbles in the
# wrong order would see; the FT-003 negative control uses it as a corrupted block decode.
_PACKED_REGION: dict[QT, tuple[int, int, int]] = {
    QT.Q4_0: (18, 2, 18),
    QT.Q4_1: (20, 4, 20),
    QT.Q5_0: (22, 6, 22),
    QT.Q8_0: (34, 2, 34),
    QT.Q2_K: (84, 16, 80),  # 2-bit values: swapping nibbles exchanges value pairs
    QT.Q3_K: (110, 32, 96),
    QT.Q4_K: (144, 16, 144),
    QT.Q5_K: (176, 48, 176),
    QT.Q6_K: (210, 0, 128),
}

Transform = Callable[[QT, np.ndarray], np.ndarray]


def swap_nibbles(qtype: QT, raw: np.ndarray) -> np.ndarray:
    """The corrupted-decode control: nibble order reversed in every block's packed values."""
    if qtype not in _PACKED_REGION:
        return raw
    block, lo, hi = _PACKED_REGION[qtype]
    blocks = np.array(raw, dtype=np.uint8).reshape(-1, block)
    packed = blocks[:, lo:hi]
    blocks[:, lo:hi] = (packed << 4) | (packed >> 4)
    return blocks.reshape(-1)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "Q4KTeacher needs CuPy and a CUDA GPU (pip install '.[cuda]'); "
            f"cupy is not importable: {exc}"
        ) from exc
    return cupy


class _Uploader:
    """Streams tensor bytes from the memory map to the device through two pinned buffers."""

    def __init__(self, cp: Any, chunk: int = STAGING_CHUNK) -> None:
        self.cp = cp
        self.chunk = chunk
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pinned = [cp.cuda.alloc_pinned_memory(chunk) for _ in range(2)]
        self.views = [np.frombuffer(p, dtype=np.uint8, count=chunk) for p in self.pinned]
        self.events = [cp.cuda.Event(), cp.cuda.Event()]
        self.used = [False, False]
        self.turn = 0

    def upload(self, src: np.ndarray, dst: Any) -> Any:
        """Queue src's bytes into ``dst`` (a uint8 device array of src's size); returns dst."""
        cp = self.cp
        for off in range(0, src.size, self.chunk):
            n = min(self.chunk, src.size - off)
            i = self.turn
            if self.used[i]:
                self.events[i].synchronize()  # the DMA that last read this buffer is done
            self.views[i][:n] = src[off : off + n]
            cp.cuda.runtime.memcpyAsync(
                dst.data.ptr + off, self.pinned[i].ptr, n, cp.cuda.runtime.memcpyHostToDevice,
                self.stream.ptr,
            )
            self.events[i].record(self.stream)
            self.used[i] = True
            self.turn = 1 - i
        return dst

    def finish(self) -> None:
        self.stream.synchronize()


class Q4KOps:
    """``teacher.forward.WeightOps`` over raw quantized bytes on the GPU.

    Activations are ``dtype``: float16 by default (see ``ACTIVATION_DTYPES``),
    bfloat16 or float32. Each linear takes the kernel path ``launch.dispatch_path``
    names for its M: the GEMV / fused kernels write float32, cast to ``dtype``; the
    large-M path decodes row chunks of W into a bounded scratch of ``dtype`` (bf16
    for the lm_head under f16 activations, ``head_bf16``) and multiplies each with
    torch's cuBLAS GEMM (the GEMM a dense model runs). The
    tensor-core GEMVs (M <= 32, K-quants) are bf16 kernels: f16 x reaches them as
    bf16, and the float GEMV as float32. CuPy launches go to torch's current
    stream, so the forward captures into a CUDA graph, and every temporary comes
    from torch's allocator (graph-aware, one pool).
    """

    def __init__(
        self,
        weights: dict[str, DeviceWeight],
        vectors: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype = torch.float16,
        scratch_bytes: int | None = None,
    ) -> None:
        from cupy_kernels import launch

        self._launch = launch
        self._cp = launch._cp()
        self._streams: dict[int, Any] = {}  # torch stream handle -> its CuPy ExternalStream
        self.weights = weights
        self.vectors = vectors
        self._cast: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.device = device
        self.set_activation_dtype(dtype)
        # linears dispatched to each kernel path (host side, also while a graph is captured):
        # FT-003 checks with it that each of its per-path items ran the path it names
        self.taken: Counter[str] = Counter()
        # controls only: path -> weights used instead of ``weights`` by linears on that path,
        # so a wrong decode can be confined to one kernel path (the dequant path included)
        self.path_overrides: dict[str, dict[str, DeviceWeight]] = {}
        # bytes of the decode scratch of the large-M path
        self.scratch_bytes = int(launch.DEQUANT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes)
        if self.scratch_bytes < 1:
            raise ValueError(f"scratch_bytes={scratch_bytes} must be positive")
        self._scratches: list[torch.Tensor] = []
        # The lm_head's decode + cuBLAS GEMM in bf16 where activations are f16. f16 is
        # kept for the layers because bf16's rounding, amplified through them, took
        # FT-Q4K-TEACHER-003 below 0.999 on the 7B shape; nothing runs after the head,
        # and cuBLAS's bf16 GEMM ran 3-5 % faster than its f16 one on the H200.
        self.head_bf16 = True
        # the wgmma GEMM (f16 x, Q4_K / Q6_K) exists on sm_90 only
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.hopper = bool(launch.is_hopper(index))
        self.sms = int(launch.sm_count(index))
        # the wgmma GEMM's workspace (partial tiles of stream-K), shared like the decode
        # scratch by every linear, eager or graphed, in stream order; torch's memory, so the
        # bench's working set counts it; the CuPy view made once
        self._wg_workspace: Any = None
        if self.hopper and any(int(w.qtype) in launch.WGMMA_TYPES for w in weights.values()):
            ws = torch.zeros(launch.wgmma_workspace_bytes(self.sms), dtype=torch.uint8, device=device)
            self._wg_workspace = self._cp.from_dlpack(ws)

    def _torch_stream(self) -> Any:
        # one CuPy wrapper per torch stream, made once: a new one per linear cost host time
        # in every eager forward and, on CuPy 14, a DeprecationWarning each (~9,000 a sign-off)
        ptr = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._streams[ptr] = self._cp.cuda.ExternalStream(ptr)
        return stream

    def path_for(self, w: DeviceWeight, m: int) -> str:
        # f16 x takes the bf16 kernels' paths: it is handed to them as bf16 (see linear)
        return str(self._launch.dispatch_path(
            m, w.qtype, w.n, w.k, x_is_bf16=self.dtype != torch.float32,
            x_is_f16=self.dtype == torch.float16, hopper=self.hopper,
        ))

    def set_activation_dtype(self, dtype: torch.dtype) -> None:
        """Switch the activation dtype (the runner's fallback when f16 overflows)."""
        if dtype not in ACTIVATION_DTYPES.values():
            raise ValueError(f"activation dtype {dtype} is not one of {', '.join(ACTIVATION_DTYPES)}")
        self.dtype = dtype

    def linear(self, x: torch.Tensor, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self.weights:  # a small 2-D F32 tensor the kernels have no type for
            y = x.float() @ self.vectors[name].T
            return y.to(self.dtype) if out is None else out.copy_(y)
        w = self.weights[name]
        xin = x.to(self.dtype).contiguous()
        m = int(xin.shape[0])
        path = self.path_for(w, m)
        self.taken[path] += 1
        w = self.path_overrides.get(path, {}).get(name, w)
        if self.dtype == torch.float16 and path.startswith("gemv"):
            # the GEMVs read bf16 (tensor-core) or float32 (float decode) x, never f16
            xin = xin.to(torch.bfloat16 if path != "gemv" else torch.float32)
        with record_function(matmul_label(name, path)), self._torch_stream():
            if path == "dequant":
                y = out if out is not None else torch.empty((m, w.n), dtype=self.dtype, device=self.device)
                gemm_dtype = self._gemm_dtype(name)
                return matmul_into(xin.to(gemm_dtype), self._decoded_chunks(w, gemm_dtype), y)
            # the kernels write float32, and the wgmma GEMM also f16 unless it adds atomically;
            # f16 only where f16 is what is wanted (f16 activations or an f16 out): a float32
            # or bf16 out gets float32, rounded once
            f16 = path == "wgmma" and self._launch.wgmma_writes_f16(m, w.n, w.k, self.sms, w.qtype)
            want = self.dtype if out is None else out.dtype
            kernel_dtype = torch.float16 if f16 and want == torch.float16 else torch.float32
            ws = {"workspace": self._wg_workspace} if path == "wgmma" else {}
            if out is not None and out.dtype == kernel_dtype and out.is_contiguous():
                self._launch.qmatmul(xin, w.data, w.qtype, w.n, w.k, out=out, path=path, **ws)
                return out
            y = torch.empty((m, w.n), dtype=kernel_dtype, device=self.device)
            self._launch.qmatmul(xin, w.data, w.qtype, w.n, w.k, out=y, path=path, **ws)
        return y.to(self.dtype) if out is None else out.copy_(y)

    def _gemm_dtype(self, name: str) -> torch.dtype:
        """The dtype a decode + cuBLAS linear multiplies in: the activations', but bf16
        for the lm_head under f16 activations (``head_bf16``)."""
        if self.head_bf16 and self.dtype == torch.float16 and name in HEAD_NAMES:
            return torch.bfloat16
        return self.dtype

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """The one decode scratch of every dequant-path linear, eager or graphed: stream
        order makes each GEMM finish reading it before the next decode writes. A scratch
        per call sat once in the graph's pool and again in the allocator's cache for the
        eager lm_head, 2 x 160 MiB in FT-Q4K-TEACHER-002's peak. Sized at first use for
        the largest chunk of any weight; a larger need (a wider dtype) adds a new one and
        keeps the old, which a captured graph may still write into."""
        if not self._scratches or self._scratches[-1].numel() < nbytes:
            size = self.dtype.itemsize
            widest = max(
                (self._launch.dequant_chunk_rows(w.n, w.k, size, self.scratch_bytes) * w.k * size
                 for w in self.weights.values()), default=0,
            )
            self._scratches.append(torch.empty(max(nbytes, widest), dtype=torch.uint8, device=self.device))
        return self._scratches[-1]

    def _decoded_chunks(self, w: DeviceWeight, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(row0, W rows decoded to ``dtype``) chunk by chunk, all through the one scratch."""
        rows = self._launch.dequant_chunk_rows(w.n, w.k, dtype.itemsize, self.scratch_bytes)
        nbytes = rows * w.k * dtype.itemsize
        scratch = self._scratch(nbytes)[:nbytes].view(dtype).view(rows, w.k)
        for n0 in range(0, w.n, rows):
            part = scratch[: min(rows, w.n - n0)]
            self._launch.qdequant(w.data, w.qtype, w.n, w.k, row0=n0, out=part)
            yield n0, part

    def embed(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        w = self.weights[name]
        rows = torch.empty((ids.numel(), w.k), dtype=torch.float32, device=ids.device)
        with self._torch_stream():
            # ids were validated on the host (as_id_batch): no device check, no sync
            self._launch.qembed(ids.contiguous(), w.data, w.qtype, w.n, w.k, out=rows, check_ids=False)
        return rows.to(self.dtype)

    def vector(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return cast_once(self._cast, name, self.vectors[name], dtype)

    def has(self, name: str) -> bool:
        return name in self.weights or name in self.vectors


class Q4KTeacher(RunnerTeacher):
    """Frozen GGUF teacher whose weights never leave their quantized blocks on the GPU."""

    __slots__ = (
        "_native_vocab",
        "_ops",
        "_runner",
        "_vocab",
        "config",
        "device",
        "load_seconds",
        "path",
        "uploaded_bytes",
    )
    path: Path
    config: ModelConfig
    device: torch.device
    load_seconds: float
    uploaded_bytes: dict[str, int]
    _native_vocab: int
    _vocab: int
    _ops: Q4KOps
    _runner: ForwardRunner

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use Q4KTeacher.from_gguf(path, target_vocab=None, device=0)")

    @classmethod
    def from_gguf(
        cls,
        path: str | Path,
        target_vocab: int | None = None,
        device: int = 0,
        *,
        transform: Transform | None = None,
        activation_dtype: torch.dtype = torch.float16,
        graphs: bool = True,
        transform_path: str | None = None,
        scratch_mib: float | None = None,
    ) -> Q4KTeacher:
        """Open, validate and upload ``path``; ``transform`` alters raw blocks (controls only).

        ``transform_path``: apply ``transform`` only to what linears on that kernel path
        (one of ``launch.PATHS``) read: the file's blocks go up twice, as they are and
        transformed (controls only; twice the weight memory).

        ``activation_dtype``: float16 (default; bfloat16 where f16 overflows), bfloat16
        or float32 (see ``ACTIVATION_DTYPES``).
        ``graphs``: replay the forward from a CUDA graph per input shape.
        ``scratch_mib``: size of the decode scratch (default: launch.DEQUANT_SCRATCH_BYTES,
        160 MiB, which holds a whole 7B FFN weight; less memory, narrower GEMMs)."""
        model = open_gguf(path)  # validates every tensor before anything touches the GPU
        cfg = check_model(model).config  # and the metadata against the tensors the forward reads
        vocab = effective_vocab(cfg.vocab_size, target_vocab)
        from cupy_kernels import launch

        cp = _cupy()
        with cp.cuda.Device(device):
            t0 = time.perf_counter()
            overrides: dict[str, dict[str, DeviceWeight]] = {}
            if transform_path is not None:
                if transform_path not in launch.PATHS:
                    raise ValueError(f"transform_path {transform_path!r} is not one of {launch.PATHS}")
                overrides[transform_path] = _upload(model, cp, device, transform, launch.SUPPORTED)[0]
                transform = None
            weights, vectors, per_type = _upload(model, cp, device, transform, launch.SUPPORTED)
            cp.cuda.Device(device).synchronize()
            seconds = time.perf_counter() - t0
        obj = object.__new__(cls)
        obj.path = Path(path)
        obj.config = cfg
        obj.device = torch.device("cuda", device)
        obj._native_vocab = cfg.vocab_size
        obj._vocab = vocab
        scratch = None if scratch_mib is None else int(scratch_mib * (1 << 20))
        obj._ops = Q4KOps(weights, vectors, obj.device, activation_dtype, scratch)
        obj._ops.path_overrides = overrides
        obj._runner = ForwardRunner(cfg, obj._ops, obj.device, graphs, overflow_fallback=torch.bfloat16)
        obj.load_seconds = seconds
        obj.uploaded_bytes = dict(per_type)
        total = sum(per_type.values())
        log.info(
            "uploaded %s to GPU %d as raw GGUF blocks: %s; total %.1f MiB in %.2f s (%.2f GB/s)",
            obj.path.name, device,
            ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sorted(per_type.items())),
            total / MIB, seconds, total / seconds / 1e9 if seconds > 0 else float("inf"),
        )
        return obj

    # -- provider boundary (vocab_size, logits_for_batch, logit_chunks, prefetch: RunnerTeacher)
    def native_vocab_size(self) -> int:
        return self._native_vocab

    @property
    def activation_dtype(self) -> torch.dtype:
        return self._ops.dtype

    @property
    def ops(self) -> Q4KOps:
        return self._ops

    def device_weights(self) -> dict[str, DeviceWeight]:
        return dict(self._ops.weights)

    def device_vectors(self) -> dict[str, torch.Tensor]:
        return dict(self._ops.vectors)

    # -- frozen: these exist only to refuse --------------------------------
    @deprecated("a frozen Q4K teacher cannot be trained: it has no gradients")
    def backward(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise FrozenTeacherError("Q4KTeacher is frozen: backward() is not supported")

    @deprecated("a frozen Q4K teacher cannot be trained: it has no parameters")
    def requires_grad_(self, requires_grad: bool = True) -> NoReturn:
        raise FrozenTeacherError("Q4KTeacher is frozen: its weights are quantized bytes, not parameters")

    @deprecated("a frozen Q4K teacher cannot be trained")
    def train(self, mode: bool = True) -> NoReturn:
        raise FrozenTeacherError("Q4KTeacher is frozen: there is no training mode")

    def parameters(self) -> list[torch.nn.Parameter]:
        """Always empty: an optimizer built from it has nothing to update (and torch refuses it)."""
        return []


def _upload(
    model: GGUFModel,
    cp: Any,
    device: int,
    transform: Transform | None,
    supported: frozenset[QT],
) -> tuple[dict[str, DeviceWeight], dict[str, torch.Tensor], dict[str, int]]:
    weights: dict[str, DeviceWeight] = {}
    vectors: dict[str, torch.Tensor] = {}
    per_type: dict[str, int] = defaultdict(int)
    quantized: list[TensorRecord] = []
    tdev = torch.device("cuda", device)
    for name, rec in model.tensors.items():  # first: a tensor no kernel reads fails before the upload
        if len(rec.shape) == 2 and rec.qtype in supported:
            quantized.append(rec)
        else:
            vectors[name] = _small_f32(model, rec).to(tdev)
            per_type[f"{rec.qtype.name}->F32 (small)"] += vectors[name].numel() * 4
    offsets, total = arena_layout([rec.nbytes for rec in quantized])
    # one allocation for every weight: the driver maps each cudaMalloc in 2 MiB pages, so a
    # buffer per tensor cost the 7B's 198 weights 0.19 GiB of device memory that no tensor used
    arena = cp.empty(total, dtype=cp.uint8)
    uploader = _Uploader(cp)
    for rec, off in zip(quantized, offsets, strict=True):
        raw = rec.data if transform is None else transform(rec.qtype, rec.data)
        src = np.ascontiguousarray(raw).reshape(-1)
        if src.size != rec.nbytes:
            raise ValueError(f"{model.path}: transform changed tensor {rec.name} from {rec.nbytes} to {src.size} bytes")
        data = uploader.upload(src, arena[off : off + rec.nbytes])
        weights[rec.name] = DeviceWeight(rec.name, rec.qtype, rec.shape[0], rec.shape[1], data)
        per_type[rec.qtype.name] += rec.nbytes
    uploader.finish()
    return weights, vectors, per_type


def arena_layout(sizes: Sequence[int], align: int = ARENA_ALIGN) -> tuple[list[int], int]:
    """(offset of each of ``sizes`` in one buffer, the buffer's bytes): in order, each
    offset a multiple of ``align`` (the kernels' 16-byte vector loads need it; 256 is what
    cudaMalloc itself guarantees)."""
    offsets, end = [], 0
    for size in sizes:
        if size < 0:
            raise ValueError(f"a tensor of {size} bytes")
        start = -(-end // align) * align
        offsets.append(start)
        end = start + size
    return offsets, max(end, 1)


def _small_f32(model: GGUFModel, rec: TensorRecord) -> torch.Tensor:
    """Norms and biases: tiny, kept as F32. A large tensor here means a type the kernels lack."""
    numel = int(np.prod(rec.shape))
    if len(rec.shape) != 1 and numel > (1 << 20):
        raise ValueError(
            f"{model.path}: tensor {rec.name} ({rec.qtype.name}, shape {rec.shape}) has no "
            "quantized kernel and is too large to hold as F32 in a Q4K-native teacher"
        )
    return torch.from_numpy(np.ascontiguousarray(dequantize(rec.data, rec.qtype, rec.shape)))
