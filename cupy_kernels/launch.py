"""Thin launchers for the quantized-weight CUDA kernels (kernels.cu + dequant.cuh).

Two kernel families, one launcher each:

* :func:`qmatmul` -- ``y = x @ W.T`` from the raw GGUF bytes of ``W`` ([N, K]);
  a GEMV for small M (tensor-core on exact integer weights for K-quants with
  bf16 x up to M = 32, float decode up to M = 8 otherwise), a bf16 / f16
  tensor-core GEMM (weights decoded tile by tile into shared memory) below
  DEQUANT_MIN_M, and dequantize + cuBLAS in bounded chunks from there on
  (:func:`dispatch_path`); on an sm_90 GPU, Q4_K and Q6_K with f16 x take the
  wgmma GEMM of wgmma.cu (weights decoded in registers) for WGMMA_MIN_M[format]..WGMMA_MAX_M[format],
  and over WGMMA_WIDE's range for large weights.
  x may be float32, bfloat16 or float16; the GEMM and the decode keep f16 x in
  f16 (the GEMV family takes it as float32).
* :func:`qdequant` -- rows of W decoded to float32 / bf16 / f16 (the large-M path's
  decode, also used by the teacher, which runs the GEMM through torch).
* :func:`qembed` -- embedding row gather from a quantized table.

CuPy is imported lazily: this module imports on a machine without CuPy or a
GPU, and :class:`CudaUnavailable` is raised at the first launch instead.  Each
format's module is compiled once per process (``cupy.RawModule`` with
``name_expressions``) and cached.  Inputs may be CuPy arrays or torch CUDA
tensors (taken through DLPack, no copy); results are CuPy arrays
(``torch.from_dlpack(y)`` gives a torch view).  Every argument is validated
before any launch: a wrong dtype, shape, device, alignment or a K that is not
a multiple of the format's block raises ``ValueError`` naming the argument and
the number at fault.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QT

__all__ = [
    "PATHS",
    "SUPPORTED",
    "CudaUnavailable",
    "dequant_chunk_rows",
    "dispatch_path",
    "kernel_block",
    "qdequant",
    "qembed",
    "qmatmul",
    "row_bytes",
]


class CudaUnavailable(RuntimeError):
    """No usable CUDA device (or CuPy is not installed)."""


# Format -> (values per kernel block, bytes per kernel block).  F16/BF16 are
# decoded in blocks of 16 values (see dequant.cuh), so their K must be a
# multiple of 16; every other format uses its GGUF block.
_BLOCKS: dict[QT, tuple[int, int]] = {
    QT.F16: (16, 32),
    QT.BF16: (16, 32),
    QT.Q4_0: (32, 18),
    QT.Q4_1: (32, 20),
    QT.Q5_0: (32, 22),
    QT.Q8_0: (32, 34),
    QT.Q2_K: (256, 84),
    QT.Q3_K: (256, 110),
    QT.Q4_K: (256, 144),
    QT.Q5_K: (256, 176),
    QT.Q6_K: (256, 210),
}

SUPPORTED: frozenset[QT] = frozenset(_BLOCKS)

# Every kernel path qmatmul can take, as dispatch_path names them.
PATHS: tuple[str, ...] = ("gemv1_tc", "gemv_tc", "gemv", "mma", "wgmma", "dequant")
# M at or below which the GEMV kernel runs; above it the fused tensor-core GEMM,
# and from DEQUANT_MIN_M on the chunked dequantize + cuBLAS path (see qmatmul).
GEMV_MAX_M = 8
# M up to which the tensor-core GEMV (K-quants, bf16 x) runs: its NT column tiles
# of 8 rows share each decoded weight fragment (NT = 1, 2, 4, 8 compiled)
GEMV_TC_MAX_M = 32
GEMV_TC_NT: int | None = None  # column tiles per warp; None: the fewest that hold M
_TC_NT = (1, 2, 4, 8)
# From here the decode-then-cuBLAS path beats the fused mma kernel: on the H200,
# at M = 64 on the 7B shapes, 95-114 us against 114-126 us (Q4_K/Q6_K, bf16 x;
# lm_head Q4_K within 3%), once the decode ran at ~4 TB/s.  It was 128 before.
DEQUANT_MIN_M = 64
# bound of the transient dequantized weight scratch of the chunked path.  Fewer,
# wider GEMMs win over an L2-sized scratch: 7B teacher on the H200, 1 x 512
# forward 26.1 / 24.3 / 23.2 / 22.8 / 21.8 ms with 16 / 24 / 32 / 64 / 160 MiB
# (8 x 512 within 2% from 32 MiB on); 160 MiB holds a whole 7B FFN weight in bf16.
DEQUANT_SCRATCH_BYTES = 160 << 20
# decode groups each thread of dequant_rows has in flight (1, 2 or 4 compiled)
DEQUANT_UNROLL = 1
_DEQUANT_UNROLLS = (1, 2, 4)
# CTAs per SM of the grid-stride decode (256 threads each; 8 are resident at once, the
# rest queue behind them).  H200, 8 x 18944 x 3584 weights decoded to f16: 32 per SM
# ran Q4_K at 3.71 TB/s (read + write) and Q6_K at 3.39, against 3.59 / 3.24 with
# 16, 3.51 / 3.15 with 8; a 1 GiB memset wrote at 3.36 TB/s in the same run.
DEQUANT_CTAS_PER_SM = 32
_GEMV_MT = (1, 2, 4, 8)  # compiled GEMV widths (M rounded up to one of these)
# GEMV shape (see kernels.cu): R rows per warp share each activation load, U
# decode groups per lane are in flight per loop trip.  (R, U) for M <= 2 is one
# of GEMV_SMALL_VARIANTS (the bench compares them); larger M uses (2, 2).
GEMV_SMALL_VARIANTS: tuple[tuple[int, int], ...] = ((2, 2), (2, 4), (4, 2), (1, 4))
GEMV_SMALL = (2, 2)  # (2, 4) measured 5-20% slower (NOTES.md v3)
# bulk L2 prefetch of each GEMV row (Hopper; a no-op elsewhere)
GEMV_PREFETCH = False  # measured 0-20% slower on the 7B shapes (NOTES.md v4)
_GEMM_TILE = 128  # BM = BN = BK
# Formats with an integer fragment decode (qfrag.cuh): with bf16 activations
# their GEMV runs on the tensor cores (gemv_tc; the _M1_KERNELS at M = 1), exact
# like the float GEMV.  From M = 2 on the tensor-core kernels win 1.7-2.8x; at
# M = 1 only where GEMV_TC_M1_MIN_WEIGHTS says (NOTES.md v6, v7).
_TC_TYPES = frozenset({int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)})
GEMV_TC = True  # False: the float GEMV for every format (the bench compares both)
GEMV_TC_FOLD = False  # keep 128 + q and fold the bias into c (gemv_tc FOLD)
# M = 1 kernels that put the block's scale groups in the mma columns
_M1_KERNELS = {int(QT.Q4_K): "gemv1_tc", int(QT.Q6_K): "gemv1_tc_q6k"}
GEMV_TC_M1 = True  # use them (False: gemv_tc with one used column, for the bench)
# At M = 1, the weight count (N * K) from which a format's GEMV runs on the
# tensor cores; a format not listed keeps the float GEMV at M = 1.  Q4_K:
# always (73-104% of the copy bandwidth against 50-60%).  Q6_K: gemv1_tc_q6k
# wins from the 7B mid shapes on (N * K = 68 M: 75% against 68-70%; lm_head 96%
# against 80%) and loses by ~7% on 3584 x 3584 (13 M).  Q5_K: not measured with
# the tensor cores at M = 1.
GEMV_TC_M1_MIN_WEIGHTS: dict[int, int] = {int(QT.Q4_K): 0, int(QT.Q6_K): 1 << 25}
GEMV_TC_WPR: int | None = None  # warps per 16-row tile along K; None: chosen by shape


# The Hopper fused GEMM (wgmma.cu): weights decoded in registers and fed to
# wgmma as its A operand, f16 x from shared memory; sm_90 only, f16 x only.
WGMMA = True  # dispatch_path may pick it (False: the paths as before it, for the bench)
# Its range per format, from where it beats the tensor-core GEMV up to WGMMA_MAX_M,
# H200, f16 x, 18944x3584 / 3584x18944 / 152064x3584 summed.  Q4_K
# (docs/results/wgmma-producer-small-m-h200.json, session 11): it loses to the GEMV
# up to M = 8 (271 against 246-264 us) and wins from M = 12 (272 against 335; M = 32:
# 293 against 627).  Q6_K (wgmma-q6k-h200.json, session 12), whose decode costs about
# 1.5x Q4_K's per weight: the GEMV took 352 us at M = 12 and 415 at 16; session 14's
# kernel (lean producer, stream-K) takes 307 at M = 16, flat in M up to 64 (it was 511),
# so Q6_K starts at 12 too.  The upper end (WGMMA_MAX_M), against decode + cuBLAS, x torch
# bf16 on the same three shapes, H200, session 19 (bench-kernels-h200.json, and
# bench-kernels-q6k256-h200.json for Q6_K taken to 256): Q4_K on 256-token tiles 0.63 /
# 0.74 / 0.71 at M = 256 against 0.48 / 0.51 / 0.46 (session 15).  Q6_K, whose tiles end
# at 128 tokens, lost there: 124 / 120 / 905 us against 108 / 115 / 876, so it ends at
# 128 (an H100 experiment of session 18 had it ahead, 0.53 / 0.57 / 0.53 against 0.45 /
# 0.47 / 0.42: the margin is small either way).  Q4_K stops at 256: at 512 the H100
# experiment had the FFN shapes a wash (0.72 / 0.78 against 0.65 / 0.67), and the 7B-shape
# teacher at 1x512 ran 0.656 of dense with Q4_K up to 512 against 0.699 without.
WGMMA_MIN_M: dict[int, int] = {int(QT.Q4_K): 12, int(QT.Q6_K): 12}
WGMMA_TYPES: frozenset[int] = frozenset(WGMMA_MIN_M)
WGMMA_MAX_M: dict[int, int] = {int(QT.Q4_K): 256, int(QT.Q6_K): 128}
# Past WGMMA_MAX_M, per format: (first M, last M, least weights N * K) over which the wgmma
# GEMM still runs, for large weights only.  The 256-token tiles read each weight once for 512
# tokens where decode + cuBLAS writes it out in f16 first; the 7B FFN shapes and the lm_head
# hold 2^26 weights or more, its attention projections 12.8 M or fewer, whose few tiles on
# 132 SMs split K and lost (the 1x512 teacher ran 0.656 of dense with every Q4_K linear on
# the wgmma GEMM up to 512 against 0.699 without, session 18, an H100).  The range is where it
# won on all three large 7B shapes at every grid M (H100, session 24,
# docs/results/wgmma-wide-ab-s24-h100.json): from 576 a third token tile starts and it lost.
# Since split tiles are summed in the kernel (session 26) it wins from the first M past 256:
# 0.81-0.86 of decode + cuBLAS's time at M = 264-288 and 0.49-0.88 up to 512 on all three
# (H100, session 30, docs/results/wgmma-wide-ab-h100.json; a second token tile costs the same
# however few of its rows are used, so 257 runs as 264 does).  Past 512 it still loses on
# 3584 x 18944 (1.03-1.04 at 640-768).
WGMMA_WIDE: dict[int, tuple[int, int, int]] = {int(QT.Q4_K): (257, 512, 1 << 26)}
_WG_ROWS = 128  # weight rows per CTA (wgmma.cu's ROWS) of every tile but the tall one
# The tall tile (wgmma.cu's ROWS = 256, Q4_K only): 128 tokens x 256 weight rows, a ring of
# four 52-KiB slots, where the 256-token tile holds three of 74 KiB for the same 32,768
# products a step (0.7x the bytes per multiply-add, twice the decode per token).
_WG_TALL = (128, 256, 4)  # tokens, weight rows, slots
# The M range (first, last) per format over which the wgmma GEMM runs on the tall tile
# instead of the token tiles of _WG_NTOK; its kernels are compiled only while a range is set.
# Empty: the tall tile lost where it was meant to win (H100, session 32,
# docs/results/wgmma-tall-ab-h100.json, NOTES.md v32): 1.17-1.41x the 256-token tile's time
# at M = 256 and 512 on the three large 7B shapes, 0.98-1.05x at 384, and the 1x512 teacher
# forward 21.15 against 19.43 ms.  Each step's decode costs twice per token, and the MMA
# warps' instructions, not x's arrival alone, hold it.
WGMMA_TALL: dict[int, tuple[int, int]] = {}
# per format, as wgmma.cu's WgCfg: (K values per ring slot, smem bytes per weight row
# per slot, slots in the ring per token tile)
_WG_RING: dict[int, tuple[int, int, dict[int, int]]] = {
    int(QT.Q4_K): (128, 80, {64: 8, 128: 5, 256: 3}),
    int(QT.Q6_K): (256, 240, {64: 3, 128: 2}),
}
# tokens per CTA tile, compiled per format (the ring's keys); a GEMM takes the smallest that
# holds M, else the largest.  256 (Q4_K only: a Q6_K slot that wide leaves a ring of one slot)
# halves the decode per token: at M = 256 it ran 0.79-0.93x torch on an H100 where 128 ran
# 0.72-0.78 (session 18)
_WG_NTOK: dict[int, tuple[int, ...]] = {q: tuple(sorted(ring[2])) for q, ring in _WG_RING.items()}
_WG_MIN_STAGES_PER_SPLIT = 2
WGMMA_WAVE_FILL = 0.8  # K splits until the last wave of CTAs is this full (wgmma_plan)
# Stream-K (wgmma_plan): where the K-split grid loads the SMs unevenly, one CTA per SM
# runs an equal share of the (tile, ring slot) units instead.  Cost model in ring-slot
# times: waves x (slots per CTA + WG_CTA_SLOTS), the per-CTA cost (ring fill, epilogue)
# fitted to session 13's timings (docs/results/wgmma-producer-scales-ab-h200.json: 9 waves
# of 28 slots took 208 us on the lm_head shape, 4 waves of 10 took 40 us on 18944x3584, so
# a CTA costs ~3.8 slot times besides its slots); taken when it predicts this fraction or less.
WGMMA_STREAM_K = True
# Split tiles summed in the kernel where every CTA is resident (WgPlan.fixup), and f16 y from
# any such plan: no zeroed float32 y, no cast to f16 after it, a fixed order of the sum.
# False, as before session 25 (for the A/B, docs/experiments/wgmma_fixup_ab.py): every split
# tile adds atomically into a zeroed float32 y, and only one-tile-per-CTA grids write f16.
WGMMA_FIXUP = True
WG_CTA_SLOTS = 4
WG_STREAM_K_GAIN = 0.9
# A grid of whole tiles (no K split) at least this many waves long runs on one CTA per SM
# instead, each CTA's ring running on across its tiles: every CTA but the first wave's paid
# a ring fill from DRAM before its first wgmma (session 14, NOTES.md v16: 0.92-0.95x the
# time on the 152064 x 3584 lm_head shape, 9 waves).  0 turns it off.
WG_PERSIST_WAVES = 2


_WG_THREADS = 384  # two MMA warpgroups and one that issues the copies (wgmma.cu)


def _wg_smem(ntok: int, qtype: Any = QT.Q4_K, rows: int = _WG_ROWS) -> int:
    """Dynamic shared memory of wgmma_gemm<qtype, ntok, *, rows>: its ring of slots (WgCfg in
    wgmma.cu: x and weight rows per slot), 1,024 bytes of alignment slack and three
    mbarriers per slot (weights full, empty, x full)."""
    kslot, wrow, stages_by_ntok = _WG_RING[int(_qtype(qtype))]
    stages = _WG_TALL[2] if rows == _WG_TALL[1] else stages_by_ntok[ntok]
    return stages * (kslot * ntok * 2 + rows * wrow) + 1024 + 24 * stages


class WgPlan(NamedTuple):
    """How the wgmma GEMM spreads its work: ``tiles`` (ntok-token x ``rows``-row tiles) of
    ``slots`` ring slots each (128 K values for Q4_K, 256 for Q6_K) over ``ctas`` CTAs;
    ``resident``: all of them fit the GPU at once (one per SM) and WGMMA_FIXUP is on.  CTA b
    runs the units :meth:`cta_units` gives it, segment by segment in the order of
    :meth:`cta_segments` (wgmma.cu's WgWork)."""

    ntok: int
    tiles: int
    slots: int
    ctas: int
    resident: bool
    rows: int = _WG_ROWS

    def cta_units(self, b: int) -> tuple[int, int]:
        """Units [u, u1) of CTA b among the U = tiles x slots, as WgWork splits them: with
        U = q ctas + r, the first r CTAs run q + 1 units and the others q."""
        q, r = divmod(self.tiles * self.slots, self.ctas)
        u = b * q + min(b, r)
        return u, u + q + (1 if b < r else 0)

    def cta_of(self, unit: int) -> int:
        """The CTA that runs ``unit`` (the inverse of :meth:`cta_units`)."""
        q, r = divmod(self.tiles * self.slots, self.ctas)
        big = r * (q + 1)
        return unit // (q + 1) if unit < big else r + (unit - big) // q

    def cta_segments(self, b: int) -> list[tuple[int, int, int]]:
        """(tile, first slot, slots) of CTA b's segments in the order WgWork runs them: in
        unit order, except that a first segment starting inside its tile, where more follow,
        runs last (it finishes that tile, so it waits for the CTAs before this one)."""
        u, u1 = self.cta_units(b)
        order = [(u, u1)]
        end = (u // self.slots + 1) * self.slots
        if u % self.slots and end < u1:
            order = [(end, u1), (u, end)]
        out = []
        for a, a1 in order:
            while a < a1:
                tile, s0 = divmod(a, self.slots)
                n = min(self.slots - s0, a1 - a)
                out.append((tile, s0, n))
                a += n
        return out

    @property
    def one_tile_each(self) -> bool:
        """Each CTA one whole tile: the only grid whose f16 epilogue goes through the ring's
        shared memory (16-byte rows)."""
        return self.ctas == self.tiles

    @property
    def whole_tiles(self) -> bool:
        """Every CTA runs whole tiles only: no partial sums."""
        q, r = divmod(self.tiles * self.slots, self.ctas)
        return self.one_tile_each or (r == 0 and q % self.slots == 0)

    @property
    def fixup(self) -> bool:
        """Partial tiles meet in the workspace (:func:`wgmma_workspace_bytes`): every CTA is
        resident (one per SM), so the one that runs a tile's last slot can wait for the
        others' parts, add them in a fixed order and write y, f32 or f16."""
        return not self.whole_tiles and self.resident

    @property
    def atomics(self) -> bool:
        """A K-split grid larger than the GPU (or WGMMA_FIXUP off): its partial tiles add
        atomically into a zeroed float32 y (a CTA may not wait for one not yet resident)."""
        return not self.whole_tiles and not self.resident


def wgmma_plan(m: int, n: int, k: int, sms: int, qtype: Any = QT.Q4_K) -> WgPlan:
    """The wgmma GEMM's tile size and CTA count.

    One CTA fills an SM, so a grid of T tiles runs in ceil(T / sms) waves and a
    short last wave idles most SMs (148 tiles on 132 SMs: two waves, the second
    one 12 % full).  K is split into the fewest splits whose waves are at least
    WGMMA_WAVE_FILL full, each split keeping >= _WG_MIN_STAGES_PER_SPLIT slots; if
    none is, the fullest.  Where K had to be split, stream-K (one CTA per SM, each
    an equal run of units across tiles) replaces the split grid when the cost
    model predicts WG_STREAM_K_GAIN or less of its time.  Where K is not split and
    the tiles fill WG_PERSIST_WAVES waves or more, one CTA per SM runs them.  Cached:
    an eager linear asks twice (whether the kernel can write f16, then the launch)."""
    q = int(_qtype(qtype))
    gain = WG_STREAM_K_GAIN if WGMMA_STREAM_K else 0.0
    lo, hi = WGMMA_TALL.get(q, (0, -1))
    ntoks, rows = ((_WG_TALL[0],), _WG_TALL[1]) if lo <= m <= hi else (_WG_NTOK[q], _WG_ROWS)
    plan = _wgmma_plan(m, n, k, sms, WGMMA_WAVE_FILL, _WG_RING[q][0], gain, WG_CTA_SLOTS, WG_PERSIST_WAVES,
                       ntoks, rows)
    return plan if WGMMA_FIXUP else plan._replace(resident=False)


@functools.cache
def _wgmma_plan(
    m: int, n: int, k: int, sms: int, fill_target: float, kslot: int, gain: float, cta_slots: int,
    persist_waves: int, ntoks: tuple[int, ...], rows: int = _WG_ROWS,
) -> WgPlan:
    ntok = next((t for t in ntoks if m <= t), ntoks[-1])
    tiles = -(-m // ntok) * -(-n // rows)
    nk = k // kslot
    if tiles * nk >= 2**31:  # WgWork counts units in 32 bits
        raise ValueError(f"the wgmma GEMM counts its work in 32 bits: M={m}, n={n}, k={k} is too large")
    best, best_fill = 1, 0.0
    for want in range(1, max(1, nk // _WG_MIN_STAGES_PER_SPLIT) + 1):
        kps = -(-nk // want)
        splits = -(-nk // kps)
        ctas = tiles * splits
        fill = ctas / (-(-ctas // sms) * sms)
        if fill >= fill_target:
            best = splits
            break
        if fill > best_fill + 1e-9:
            best, best_fill = splits, fill
    ctas = tiles * best
    if best > 1:
        units = tiles * nk

        def cost(c: int) -> int:
            return -(-c // sms) * (-(-units // c) + cta_slots)

        even = min(sms, units // _WG_MIN_STAGES_PER_SPLIT)
        if even >= 1 and cost(even) <= gain * cost(ctas):
            ctas = even
    elif persist_waves and tiles >= persist_waves * sms:
        ctas = sms
    return WgPlan(ntok, tiles, nk, ctas, ctas <= sms, rows)


def _gemm_smem(q: QT) -> int:
    """Dynamic shared memory of mma_gemm<q>: bf16 X and W tiles + raw W staging."""
    qk, nb = _BLOCKS[q]
    span = (1 if qk >= _GEMM_TILE else _GEMM_TILE // qk) * nb  # Stage<QT>::SPAN
    rch = -(-span // 16) + 1
    return 2 * _GEMM_TILE * (_GEMM_TILE + 8) * 2 + _GEMM_TILE * rch * 16

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()


def _qtype(qtype: Any) -> QT:
    try:
        q = QT(int(qtype))
    except (ValueError, TypeError):
        raise ValueError(f"qtype={qtype!r} is not a GGML quantization type") from None
    if q not in SUPPORTED:
        names = ", ".join(sorted(t.name for t in SUPPORTED))
        raise ValueError(f"qtype={q.name} is not supported by the CUDA kernels (supported: {names})")
    return q


def kernel_block(qtype: Any) -> tuple[int, int]:
    """(values, bytes) of one decode block of ``qtype``: K must be a multiple of values."""
    return _BLOCKS[_qtype(qtype)]


def row_bytes(qtype: Any, k: int) -> int:
    """Bytes of one row of K values (raises ValueError if K is not a block multiple)."""
    q = _qtype(qtype)
    qk, nb = _BLOCKS[q]
    if k <= 0 or k % qk:
        raise ValueError(f"k={k} is not a positive multiple of the {q.name} block of {qk} values")
    return k // qk * nb


# --------------------------------------------------------------------------- cupy access


@functools.cache
def _cp() -> Any:
    """Import CuPy and check for a device; raise CudaUnavailable with the reason."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise CudaUnavailable(
            f"CuPy is not importable ({exc}); install the 'cuda' extra on a CUDA machine"
        ) from exc
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        raise CudaUnavailable(f"no CUDA device: {exc}") from exc
    if n < 1:
        raise CudaUnavailable("no CUDA device: cudaGetDeviceCount() returned 0")
    return cupy


def _source() -> str:
    # Inline the header: CuPy's kernel cache keys on the source text, so a
    # change to dequant.cuh must change the text that is compiled.
    parts = [(_HERE / h).read_text() for h in ("dequant.cuh", "qfrag.cuh")]
    body = (_HERE / "kernels.cu").read_text()
    for h in ("dequant.cuh", "qfrag.cuh"):
        body = body.replace(f'#include "{h}"', "")
    return "\n".join([*parts, body])


def _b(v: bool) -> str:
    return "true" if v else "false"


# activation kinds of the fused GEMM and the decode (template XT / OT in kernels.cu)
X_F32, X_BF16, X_F16 = 0, 1, 2


def _names(qt: int) -> list[str]:
    names = [f"mma_gemm<{qt}, {xt}>" for xt in (X_F32, X_BF16, X_F16)]
    names += [f"dequant_rows<{qt}, {ot}, {u}>" for ot in (X_F32, X_BF16, X_F16) for u in _DEQUANT_UNROLLS]
    for xb in (False, True):
        for mt in _GEMV_MT:
            shapes = GEMV_SMALL_VARIANTS if mt <= 2 else ((2, 2),)
            for r, u in shapes:
                names.append(f"gemv<{qt}, {mt}, {r}, {u}, {_b(xb)}>")
        if xb and qt in _TC_TYPES:
            names += [f"gemv_tc<{qt}, true, 1>"] + [f"gemv_tc<{qt}, false, {nt}>" for nt in _TC_NT]
            if qt in _M1_KERNELS:
                names.append(f"{_M1_KERNELS[qt]}<{qt}>")
        names.append(f"embed<{qt}, {_b(xb)}>")
    return names


_modules: dict[tuple[int, int], Any] = {}


def _module(qt: QT) -> Any:
    """The compiled module of one format on the current device, compiled once."""
    cp = _cp()
    key = (int(qt), int(cp.cuda.runtime.getDevice()))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = cp.RawModule(
                code=_source(), options=("--std=c++17",), name_expressions=_names(int(qt))
            )
            mod.compile()
            _modules[key] = mod
    return mod


@functools.cache
def _properties(dev: int) -> dict[str, Any]:
    """cudaGetDeviceProperties of device ``dev``, read once per process."""
    return dict(_cp().cuda.runtime.getDeviceProperties(dev))


def sm_count(dev: int) -> int:
    """Streaming multiprocessors of device ``dev``."""
    return int(_properties(dev)["multiProcessorCount"])


_functions: dict[tuple[int, int, str], tuple[Any, int]] = {}


def _kernel(qt: QT, name: str, smem: int = 0, smem_carveout: bool = False) -> Any:
    """Kernel ``name`` of qt's module on the current device, looked up once and
    allowed at least ``smem`` bytes of dynamic shared memory (set once, not per
    launch: launches sit on the decode hot path).  ``smem_carveout``: prefer the
    largest shared-memory split of L1, for kernels whose occupancy needs it."""
    key = (int(qt), int(_cp().cuda.runtime.getDevice()), name)
    fn, allowed = _functions.get(key, (None, 0))
    if fn is None:
        fn = _module(qt).get_function(name)
        if smem_carveout:
            fn.preferred_shared_memory_carveout = 100
    if smem > allowed:
        if fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        allowed = smem
    _functions[key] = (fn, allowed)
    return fn


def is_hopper(dev: int) -> bool:
    """Whether device ``dev`` is sm_90 (H100 / H200): the wgmma GEMM's only target."""
    props = _properties(dev)
    return (int(props["major"]), int(props["minor"])) == (9, 0)


def _wg_name(qtype: Any, ntok: int, out: int, rows: int = _WG_ROWS) -> str:
    tall = f", {rows}" if rows != _WG_ROWS else ""
    return f"wgmma_gemm<{int(_qtype(qtype))}, {ntok}, {out}{tall}>"


def _wg_variants() -> dict[str, tuple[int, int, int]]:
    """The compiled wgmma kernels: name -> (format, token tile, weight rows); the tall tile's
    only while WGMMA_TALL gives it a range (a launch that asks for a kernel not yet compiled
    compiles the module again with what this returns then)."""
    tiles = {q: [(nt, _WG_ROWS) for nt in _WG_NTOK[q]] for q in sorted(WGMMA_TYPES)}
    for q, (lo, hi) in WGMMA_TALL.items():
        if lo <= hi and q in tiles:
            tiles[q].append(_WG_TALL[:2])
    return {_wg_name(q, nt, out, rows): (q, nt, rows) for q, ts in tiles.items() for nt, rows in ts
            for out in (X_F32, X_F16)}


_wg_functions: dict[tuple[int, str], Any] = {}


def _wg_kernel(dev: int, name: str) -> Any:
    """A kernel of wgmma.cu on device ``dev``.  wgmma exists only for sm_90a, an
    architecture CuPy's RawModule does not target (it passes -arch=sm_90), so the
    module is compiled here with NVRTC for sm_90a and loaded as a cubin."""
    _cp()
    with _lock:
        if (dev, name) not in _wg_functions:
            from cupy.cuda import compiler, function

            if not is_hopper(dev):
                raise CudaUnavailable(f"the wgmma GEMM needs an sm_90 GPU; device {dev} is not")
            variants = _wg_variants()
            names = list(variants)
            program = getattr(compiler, "_NVRTCProgram", None)  # CuPy's NVRTC wrapper (private)
            if program is None:
                raise CudaUnavailable(
                    f"CuPy {_cp().__version__} has no cupy.cuda.compiler._NVRTCProgram to compile wgmma.cu "
                    "for sm_90a; set cupy_kernels.launch.WGMMA = False to use the other paths"
                )
            prog = program((_HERE / "wgmma.cu").read_text(), "wgmma.cu", name_expressions=names, method="cubin")
            cubin, mapping = prog.compile(("--std=c++17", "-arch=sm_90a"))
            mod = function.Module()
            mod.load(cubin)
            for nm, (qt, ntok, rows) in variants.items():
                fn = mod.get_function(mapping[nm])
                # a raw Function: its shared-memory limit through the driver
                # (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8)
                _cp().cuda.driver.funcSetAttribute(fn.ptr, 8, _wg_smem(ntok, qt, rows))
                _wg_functions[(dev, nm)] = (fn, mod)
    return _wg_functions[(dev, name)][0]


# CUtensorMap arguments of cuTensorMapEncodeTiled (cuda.h): f16 elements, 128-byte swizzle
# (the layout the wgmma descriptors read), L2 promotion by 128-byte lines, zeros out of bounds
_CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6
_CU_TENSOR_MAP_SWIZZLE_128B = 3
_CU_TENSOR_MAP_L2_PROMOTION_L2_128B = 2
_TMA_MAP = np.dtype((np.void, 128))
_libcuda: Any = None


def _encode_tiled() -> Any:
    """The driver's cuTensorMapEncodeTiled through ctypes (CuPy does not wrap it)."""
    global _libcuda
    if _libcuda is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaUnavailable(f"the wgmma GEMM's tensor map needs the CUDA driver (libcuda.so.1): {exc}") from exc
        f = lib.cuTensorMapEncodeTiled
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int]
        _libcuda = lib
    return _libcuda.cuTensorMapEncodeTiled


def wgmma_x_box_rows(m: int, ntok: int) -> int:
    """Token rows per TMA copy of x in the wgmma GEMM (its XBOX): the whole token tile where
    every tile is full, else the least power of two from 8 that holds the last tile's rows,
    at most 64, so that the copies of the last tile read few rows past M.  A box's rows past
    M arrive as zeros but take TMA's time: with 256-row boxes at M = 320 (192 rows of the
    second tile past M) the kernel took 1.07-1.16x the cp.async version's time, and at M = 16
    on 64-row tiles 1.02-1.19x (H100, session 31, NOTES.md v31)."""
    rest = m % ntok
    if rest == 0:
        return ntok
    box = 8
    while box < min(rest, 64):
        box *= 2
    return box


def _x_tensor_map(xc: Any, box_rows: int) -> Any:
    """The tensor map the wgmma GEMM reads f16 x [M, K] through (wgmma.cu's TmaMap): boxes of
    64 columns x ``box_rows`` token rows, 128-byte swizzle, rows past M read as zeros.  Passed by
    value (a size-one NumPy array is a by-value kernel argument in CuPy), so a captured CUDA
    graph keeps it; it holds x's address, which a graph's replays keep as well."""
    m, k = (int(v) for v in xc.shape)
    buf = np.zeros(128 + 64, dtype=np.uint8)  # a CUtensorMap is 64-byte aligned
    off = -buf.ctypes.data % 64
    tmap = buf[off:off + 128].view(_TMA_MAP)
    dims = (ctypes.c_uint64 * 2)(k, m)
    strides = (ctypes.c_uint64 * 1)(2 * k)
    box = (ctypes.c_uint32 * 2)(64, box_rows)
    elem_strides = (ctypes.c_uint32 * 2)(1, 1)
    rc = _encode_tiled()(
        tmap.ctypes.data, _CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, ctypes.c_void_p(xc.data.ptr), dims, strides, box,
        elem_strides, 0, _CU_TENSOR_MAP_SWIZZLE_128B, _CU_TENSOR_MAP_L2_PROMOTION_L2_128B, 0,
    )
    if rc != 0:
        raise RuntimeError(
            f"cuTensorMapEncodeTiled failed (CUresult {rc}) for the wgmma GEMM's x: [{m}, {k}] f16 at "
            f"{xc.data.ptr:#x}, boxes of 64 x {box_rows}"
        )
    return tmap


def wgmma_writes_f16(m: int, n: int, k: int, sms: int, qtype: Any = QT.Q4_K) -> bool:
    """Whether the wgmma GEMM can write an f16 y itself: every tile summed within the kernel
    (no atomics into a zeroed float32 y, :attr:`WgPlan.atomics`; with WGMMA_FIXUP off, one
    whole tile per CTA only) and rows in whole 8-value pieces."""
    plan = wgmma_plan(m, n, k, sms, qtype)
    return (plan.one_tile_each or (WGMMA_FIXUP and not plan.atomics)) and n % 8 == 0


def wgmma_workspace_bytes(sms: int) -> int:
    """Bytes of the wgmma GEMM's workspace on a GPU of ``sms`` SMs: a flag per CTA (256-byte
    aligned), then a partial tile of the largest tile per CTA, float32.  Where the
    plan splits tiles between resident CTAs (:attr:`WgPlan.fixup`) it must be passed in
    zeroed; the kernel leaves it zeroed."""
    largest = max(max(max(t) for t in _WG_NTOK.values()) * _WG_ROWS, _WG_TALL[0] * _WG_TALL[1])
    return _wg_flag_bytes(sms) + sms * largest * 4


def _wg_flag_bytes(sms: int) -> int:
    return -(-4 * sms // 256) * 256


_wg_workspaces: dict[int, Any] = {}


def _wg_workspace(dev: int) -> Any:
    """qmatmul's own workspace on device ``dev``: zeroed at first use and kept (a captured
    graph may hold its address).  One per device, used in stream order."""
    cp = _cp()
    ws = _wg_workspaces.get(dev)
    if ws is None:
        stream = cp.cuda.get_current_stream()
        if cp.cuda.runtime.streamIsCapturing(stream.ptr):
            raise RuntimeError(
                f"the wgmma GEMM needs its workspace on device {dev}, first used while stream {stream.ptr:#x} "
                "captures a CUDA graph: pass qmatmul(workspace=...) (a zeroed buffer of wgmma_workspace_bytes(sms) "
                "bytes) or run a wgmma GEMM on this device once before capturing"
            )
        ws = _wg_workspaces[dev] = cp.zeros(wgmma_workspace_bytes(sm_count(dev)), dtype=cp.uint8)
    return ws


def _wgmma(q: QT, xc: Any, wc: Any, y: Any, m: int, n: int, k: int, dev: int, workspace: Any) -> None:
    """y = x @ W.T on the wgmma GEMM; y float32, or f16 unless the plan adds atomically."""
    cp = _cp()
    sms = sm_count(dev)
    plan = wgmma_plan(m, n, k, sms, q)
    f16_out = y.dtype == cp.float16
    if f16_out and plan.atomics:
        raise ValueError(
            f"the wgmma GEMM runs M={m}, n={n}, k={k} as {plan.tiles} tiles on {plan.ctas} CTAs, more than the "
            f"{sms} SMs, adding partial tiles atomically: out must be float32"
        )
    if f16_out and n % 8:
        raise ValueError(f"the wgmma GEMM writes f16 rows in 8-value pieces: n={n} is not a multiple of 8")
    part = flags = cp.uint64(0)
    if plan.atomics:
        cp.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, cp.cuda.get_current_stream().ptr)
    elif plan.fixup:
        ws = _wg_workspace(dev) if workspace is None else workspace
        if ws.nbytes < wgmma_workspace_bytes(sms):
            raise ValueError(
                f"workspace holds {ws.nbytes} bytes; the wgmma GEMM on {sms} SMs needs wgmma_workspace_bytes({sms}) "
                f"= {wgmma_workspace_bytes(sms)}"
            )
        flags = cp.uint64(ws.data.ptr)
        part = cp.uint64(ws.data.ptr + _wg_flag_bytes(sms))
    fn = _wg_kernel(dev, _wg_name(q, plan.ntok, X_F16 if f16_out else X_F32, plan.rows))
    i32 = cp.int32
    box_rows = wgmma_x_box_rows(m, plan.ntok)
    xmap = _x_tensor_map(xc, box_rows)
    fn((plan.ctas, 1, 1), (_WG_THREADS,), (wc, xmap, y, part, flags, i32(m), i32(n), i32(k), i32(box_rows)),
       shared_mem=_wg_smem(plan.ntok, q, plan.rows))


def wgmma_applies(q: Any, m: int, n: int, k: int, *, x_is_f16: bool, hopper: bool) -> bool:
    """Whether dispatch picks the wgmma GEMM: Q4_K or Q6_K, f16 x, an sm_90 GPU, M in range
    (WGMMA_MIN_M..WGMMA_MAX_M, or WGMMA_WIDE's range for an [n, k] weight that large)."""
    qi = int(_qtype(q))
    if not (WGMMA and hopper and x_is_f16 and qi in WGMMA_TYPES):
        return False
    if WGMMA_MIN_M[qi] <= m <= WGMMA_MAX_M[qi]:
        return True
    lo, hi, weights = WGMMA_WIDE.get(qi, (0, -1, 0))
    return lo <= m <= hi and n * k >= weights


def compile_all() -> dict[str, str]:
    """Compile every format's module; returns {format: 'ok' or the compiler error}."""
    out: dict[str, str] = {}
    for q in sorted(SUPPORTED, key=int):
        try:
            mod = _module(q)
            for n in _names(int(q)):
                mod.get_function(n)
            out[q.name] = "ok"
        except Exception as exc:
            out[q.name] = f"{type(exc).__name__}: {exc}"
    return out


# --------------------------------------------------------------------------- argument checks


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _as_cupy(a: Any, arg: str, *, bf16_ok: bool = False) -> tuple[Any, bool]:
    """CuPy view of a CuPy array or torch CUDA tensor (no copy).

    Returns (array, is_bf16); bf16 data comes back as a uint16/int16 view of its bits
    because CuPy has no bfloat16 dtype (float16 is CuPy's own float16).
    """
    cp = _cp()
    if isinstance(a, cp.ndarray):
        if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16, if CuPy carries one
            if not bf16_ok:
                raise ValueError(f"{arg} has dtype bfloat16, which is not accepted here")
            return a.view(cp.uint16), True
        return a, False
    if _is_torch(a):
        import torch

        if a.device.type != "cuda":
            raise ValueError(f"{arg} is a torch tensor on device {a.device}; a CUDA tensor is required")
        if a.dtype == torch.bfloat16:
            if not bf16_ok:
                raise ValueError(f"{arg} has dtype torch.bfloat16, which is not accepted here")
            return cp.from_dlpack(a.view(torch.int16)), True
        return cp.from_dlpack(a), False
    raise ValueError(
        f"{arg} must be a CuPy array or a torch CUDA tensor, got {type(a).__module__}.{type(a).__name__}"
    )


def _check_device(arrs: dict[str, Any]) -> int:
    devs = {name: int(a.device.id) for name, a in arrs.items()}
    ids = set(devs.values())
    if len(ids) != 1:
        raise ValueError(f"arguments are on different CUDA devices: {devs}")
    return ids.pop()


def _check_w(w: Any, q: QT, n: int, k: int) -> Any:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n={n!r} must be a positive int (rows of W)")
    rb = row_bytes(q, k)
    cp = _cp()
    if w.dtype not in (cp.uint8, cp.int8):
        raise ValueError(f"w must hold raw bytes (uint8), got dtype {w.dtype}")
    if not w.flags.c_contiguous:
        raise ValueError("w must be C-contiguous raw GGUF bytes")
    if w.size != n * rb:
        raise ValueError(
            f"w has {w.size} bytes but a {q.name} [{n}, {k}] tensor needs n*row_bytes = "
            f"{n}*{rb} = {n * rb}"
        )
    if w.data.ptr % 16:
        raise ValueError(f"w's data pointer {w.data.ptr:#x} is not 16-byte aligned")
    return w


# --------------------------------------------------------------------------- launchers


def qmatmul(
    x: Any,
    w: Any,
    qtype: Any,
    n: int,
    k: int,
    *,
    out: Any = None,
    path: str = "auto",
    x_is_bf16: bool = False,
    workspace: Any = None,
) -> Any:
    """``y = x @ W.T`` with W the raw GGUF bytes of an [n, k] tensor of ``qtype``.

    x: [M, k] float32, bfloat16 or float16 (CuPy or torch CUDA).  Returns a new
    (or the given ``out``) CuPy float32 array [M, n].  ``path``:

    * "gemv": exact weights, float32 accumulation: for bf16 x and Q4_K/Q5_K/Q6_K
      the tensor-core GEMV up to M = GEMV_TC_MAX_M (integer weights in bf16,
      exact products; at M = 1 only as GEMV_TC_M1_MIN_WEIGHTS says), else the
      float32-decode GEMV up to M = GEMV_MAX_M;
    * "mma": fused kernel, weight tiles decoded to bf16 (f16 for f16 x) in shared
      memory and fed to mma.sync (f32 x rounded to bf16), float32 accumulation;
    * "wgmma": Q4_K or Q6_K with f16 x on an sm_90 GPU: weights decoded in registers and
      fed to wgmma, f16 products accumulated in float32; ``out`` may also be a
      float16 [M, n] array unless a K-split grid outgrows the GPU (:func:`wgmma_writes_f16`);
    * "dequant": rows of W decoded in chunks into a scratch of at most
      DEQUANT_SCRATCH_BYTES (x's dtype; f32 for f32 x) and multiplied by cuBLAS
      (bf16 / f16, or TF32 tensor cores for f32 x), float32 output;
    f16 x on the GEMV family is converted to float32 first (M <= 32: small).
    * "auto": what :func:`dispatch_path` says: gemv for M <= GEMV_MAX_M, dequant
      for M >= DEQUANT_MIN_M, mma between, wgmma where :func:`wgmma_applies`
      ("gemv1_tc" and "gemv_tc" name members of the gemv family and are accepted
      as "gemv").
    ``x_is_bf16``: x is a CuPy uint16/int16 array holding bf16 bit patterns
    (CuPy has no bfloat16 dtype; torch bf16 tensors are recognised by themselves).
    ``workspace``: the wgmma GEMM's, a zeroed uint8 buffer of at least
    :func:`wgmma_workspace_bytes` bytes; default: one per device, allocated at first use
    (so not while a stream captures a CUDA graph).  GEMMs that share one must run in stream
    order: wgmma GEMMs that may run at the same time on two streams each need their own.
    """
    q = _qtype(qtype)
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} must be a positive int (row length of W)")
    cp = _cp()
    xc, xb = _as_cupy(x, "x", bf16_ok=True)
    if x_is_bf16:
        if xc.dtype not in (cp.uint16, cp.int16):
            raise ValueError(f"x_is_bf16=True needs x as uint16/int16 bf16 bits, got dtype {xc.dtype}")
        xb = True
    wc, _ = _as_cupy(w, "w")
    _check_w(wc, q, n, k)
    if xc.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(xc.shape)}")
    m = int(xc.shape[0])
    if m < 1:
        raise ValueError("x has M=0 rows")
    if int(xc.shape[1]) != k:
        raise ValueError(f"x has K={xc.shape[1]} columns but k={k}")
    if not xb and xc.dtype not in (cp.float32, cp.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got dtype {xc.dtype}")
    if not xc.flags.c_contiguous:
        # activations are small next to W; a contiguous copy keeps the kernels' 16-byte loads
        xc = cp.ascontiguousarray(xc)
    if xc.data.ptr % 16:
        raise ValueError(f"x's data pointer {xc.data.ptr:#x} is not 16-byte aligned")
    if path not in ("auto", *PATHS):
        raise ValueError(f"path={path!r} must be 'auto' or one of {', '.join(PATHS)}")
    if path == "auto":
        path = dispatch_path(
            m, q, n, k, x_is_bf16=xb, x_is_f16=xc.dtype == cp.float16,
            hopper=is_hopper(int(xc.device.id)),
        )
    if path == "wgmma":
        if int(q) not in WGMMA_TYPES:
            names = ", ".join(QT(t).name for t in sorted(WGMMA_TYPES))
            raise ValueError(f"path='wgmma' supports {names}, not {q.name}")
        if xc.dtype != cp.float16:
            raise ValueError(f"path='wgmma' needs float16 x, got dtype {'bfloat16' if xb else xc.dtype}")
    if path.startswith("gemv"):  # the GEMV family: which GEMV, the rules below decide
        path = "gemv"
        if xc.dtype == cp.float16:  # the GEMVs read f32 or bf16 x: f32 holds f16 exactly
            xc = xc.astype(cp.float32)
    xt = X_BF16 if xb else X_F16 if xc.dtype == cp.float16 else X_F32
    use_gemv = path == "gemv"
    use_tc = use_gemv and _tc_applies(q, m, n, k, xb)
    if use_gemv and not use_tc and m > GEMV_MAX_M:
        raise ValueError(
            f"path='gemv' supports M <= {GEMV_MAX_M} (M <= {GEMV_TC_MAX_M} for K-quants with bf16 x), got M={m}"
        )
    if max(m, n, k) >= 2**31:
        raise ValueError(f"dimension too large for 32-bit indexing: M={m}, n={n}, k={k}")
    arrs = {"x": xc, "w": wc}
    if out is not None:
        oc, _ = _as_cupy(out, "out")
        dtypes = (cp.float32, cp.float16) if path == "wgmma" else (cp.float32,)
        if oc.dtype not in dtypes or tuple(oc.shape) != (m, n) or not oc.flags.c_contiguous:
            kinds = "float32 or float16" if path == "wgmma" else "float32"
            raise ValueError(
                f"out must be a C-contiguous {kinds} [{m}, {n}] array, got {oc.dtype} {tuple(oc.shape)}"
            )
        if oc.data.ptr % 16:
            raise ValueError(f"out's data pointer {oc.data.ptr:#x} is not 16-byte aligned")
        arrs["out"] = oc
    if workspace is not None:
        arrs["workspace"], _ = _as_cupy(workspace, "workspace")
    dev = _check_device(arrs)
    with cp.cuda.Device(dev):
        y = arrs.get("out")
        if y is None:
            y = cp.empty((m, n), dtype=cp.float32)
        i32 = cp.int32
        if path == "wgmma":
            _wgmma(q, xc, wc, y, m, n, k, dev, arrs.get("workspace"))
        elif use_tc:
            _gemv_tc(q, xc, wc, y, m, n, k, dev)
        elif use_gemv:
            mt = next(t for t in _GEMV_MT if t >= m)
            r, unroll = GEMV_SMALL if mt <= 2 else (2, 2)
            units = k // 16
            groups = -(-n // r)
            # split a row across warps only while short-N shapes lack warps and
            # each lane keeps >= 2 decode groups
            wpr = 1
            while wpr < 8 and groups * wpr < 8448 and units >= 32 * wpr * 2 * 2:
                wpr *= 2
            rows_per_block = 8 // wpr
            grid = (-(-groups // rows_per_block),)
            fn = _kernel(q, f"gemv<{int(q)}, {mt}, {r}, {unroll}, {_b(xb)}>")
            fn(grid, (256,), (wc, xc, y, i32(m), i32(n), i32(k), i32(wpr), i32(int(GEMV_PREFETCH))))
        elif path == "dequant":
            _dequant_matmul(cp, q, xc, xt, wc, y, m, n, k)
        else:
            smem = _gemm_smem(q)
            fn = _kernel(q, f"mma_gemm<{int(q)}, {xt}>", smem)
            t = _GEMM_TILE
            mt_, nt_ = -(-m // t), -(-n // t)
            if nt_ > 65535:
                raise ValueError(f"n={n} exceeds the GEMM grid limit of {65535 * t} rows")
            # split K when the tile grid would not fill two waves of 2 blocks/SM;
            # each split keeps >= 4 K-steps
            steps = -(-k // t)
            target = 4 * sm_count(dev)
            splits = 1
            if mt_ * nt_ < target:
                splits = max(1, min(-(-target // (mt_ * nt_)), steps // 4))
            sps = -(-steps // splits)
            splits = -(-steps // sps)
            if splits > 1:  # partial sums are atomically added into zeros
                cp.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, cp.cuda.get_current_stream().ptr)
            fn((mt_, nt_, splits), (256,), (wc, xc, y, i32(m), i32(n), i32(k), i32(sps)), shared_mem=smem)
    return y


def dispatch_path(
    m: int, qtype: Any, n: int, k: int, *, x_is_bf16: bool, x_is_f16: bool = False, hopper: bool = False
) -> str:
    """The kernel path ``qmatmul(path="auto")`` runs for an [m, k] x against an [n, k]
    ``qtype`` weight: one of :data:`PATHS`.  Pure host logic (no CUDA needed), so
    the contracts can state which paths a parity run covered.  ``x_is_f16`` and
    ``hopper`` (an sm_90 device) open the wgmma GEMM (:func:`wgmma_applies`)."""
    q = _qtype(qtype)
    if m < 1:
        raise ValueError(f"m={m} must be >= 1")
    if wgmma_applies(q, m, n, k, x_is_f16=x_is_f16, hopper=hopper):
        return "wgmma"
    if m >= DEQUANT_MIN_M:
        return "dequant"
    if _tc_applies(q, m, n, k, x_is_bf16):
        return "gemv1_tc" if m == 1 and int(q) in _M1_KERNELS and GEMV_TC_M1 else "gemv_tc"
    return "gemv" if m <= GEMV_MAX_M else "mma"


def _tc_applies(q: QT, m: int, n: int, k: int, xb: bool) -> bool:
    """Whether the tensor-core GEMV family serves this call (K-quant, bf16 x, M in range;
    at M = 1 only from GEMV_TC_M1_MIN_WEIGHTS weights on)."""
    if not (xb and GEMV_TC and int(q) in _TC_TYPES and m <= GEMV_TC_MAX_M):
        return False
    return m > 1 or n * k >= GEMV_TC_M1_MIN_WEIGHTS.get(int(q), n * k + 1)


def gemv_tc_wpr(n: int, nblocks: int, sms: int, m: int = 2) -> int:
    """Warps per 16-row tile for gemv_tc / the M = 1 kernels: split K while the
    grid has fewer than 32 (M = 1: 128) warps per SM and each warp keeps >= 2
    blocks.  Bench: these kernels are latency-bound per warp, so short rows want
    more warps; at M = 1 the 7B shapes measured 2-5% faster with 8 warps per
    tile on 18944 x 3584 and 2 on the lm_head than with 4 and 1 (NOTES.md v7)."""
    if GEMV_TC_WPR is not None:
        return GEMV_TC_WPR
    tiles = -(-n // 16)
    target = (128 if m == 1 else 32) * sms
    wpr = 1
    while wpr < 8 and tiles * wpr < target and nblocks >= 2 * wpr:
        wpr *= 2
    return wpr


def _tc_smem(q: QT) -> int:
    """Dynamic shared memory of gemv_tc<q>: 8 warps x 2 stages x 16 staged rows."""
    rch = -(-(_BLOCKS[q][1] + 14) // 16)  # TcStage<QT>::RCH
    return 8 * 2 * 16 * rch * 16


def _gemv_tc(q: QT, xc: Any, wc: Any, y: Any, m: int, n: int, k: int, dev: int) -> None:
    cp = _cp()
    wpr = gemv_tc_wpr(n, k // _BLOCKS[q][0], sm_count(dev), m)
    if wpr not in (1, 2, 4, 8):
        raise ValueError(f"GEMV_TC_WPR={wpr} must be 1, 2, 4 or 8")
    tiles = -(-n // 16)
    grid = (-(-tiles // (8 // wpr)),)
    if m == 1 and int(q) in _M1_KERNELS and GEMV_TC_M1:
        # Q6_K stages its blocks in shared memory: 4 CTAs of 56 KiB fill the SM's 228 KiB
        smem = _tc_smem(q) if q == QT.Q6_K else 0
        fn = _kernel(q, f"{_M1_KERNELS[int(q)]}<{int(q)}>", smem, smem_carveout=smem > 0)
        fn(grid, (256,), (wc, xc, y, cp.int32(n), cp.int32(k), cp.int32(wpr)), shared_mem=smem)
        return
    nt = GEMV_TC_NT or next(v for v in _TC_NT if 8 * v >= m)
    if nt not in _TC_NT or 8 * nt < m:
        raise ValueError(f"GEMV_TC_NT={nt} must be one of {_TC_NT} and hold M={m} rows (8 per tile)")
    smem = _tc_smem(q)
    fold = GEMV_TC_FOLD and nt == 1  # the folded bias is compiled for one column tile only
    fn = _kernel(q, f"gemv_tc<{int(q)}, {_b(fold)}, {nt}>", smem)
    i32 = cp.int32
    fn(grid, (256,), (wc, xc, y, i32(m), i32(n), i32(k), i32(wpr)), shared_mem=smem)


_ONE = np.ones(1, dtype=np.float32)
_ZERO = np.zeros(1, dtype=np.float32)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1


def _dequant_matmul(cp: Any, q: QT, xc: Any, xt: int, wc: Any, y: Any, m: int, n: int, k: int) -> None:
    """Large-M path: decode row chunks of W into a bounded scratch, cuBLAS each chunk.

    Row-major y[m, n0:n1] = x @ Wc.T is, column-major, Wc^T(n1-n0 x k) @ x^T(k x m)
    with ldc = n: one gemmEx per chunk writes its column slice of y in place.
    """
    from cupy.cuda import cublas

    half = xt != X_F32
    rows = dequant_chunk_rows(n, k, 2 if half else 4)
    scratch = cp.empty((rows, k), dtype={X_F32: cp.float32, X_BF16: cp.uint16, X_F16: cp.float16}[xt])
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, 0)  # host alpha/beta
    dtype = {X_F32: _CUDA_R_32F, X_BF16: _CUDA_R_16BF, X_F16: _CUDA_R_16F}[xt]
    compute = _CUBLAS_COMPUTE_32F if half else _CUBLAS_COMPUTE_32F_FAST_TF32
    for n0 in range(0, n, rows):
        nr = min(rows, n - n0)
        qdequant(wc, q, n, k, row0=n0, out=scratch[:nr], out_is_bf16=xt == X_BF16)
        cublas.gemmEx(
            handle, _CUBLAS_OP_T, _CUBLAS_OP_N, nr, m, k,
            _ONE.ctypes.data, scratch.data.ptr, dtype, k,
            xc.data.ptr, dtype, k,
            _ZERO.ctypes.data, y.data.ptr + n0 * 4, _CUDA_R_32F, n,
            compute, -1,
        )


def dequant_chunk_rows(n: int, k: int, elem_bytes: int, budget: int | None = None) -> int:
    """Rows per chunk of the dequantize + GEMM path: the fewest chunks whose
    scratch fits ``budget`` bytes (DEQUANT_SCRATCH_BYTES by default), balanced so
    that no chunk is a sliver, in multiples of 128 rows (whole GEMM tiles)."""
    cap = max(128, (budget or DEQUANT_SCRATCH_BYTES) // (k * elem_bytes) // 128 * 128)
    chunks = -(-n // cap)
    per_chunk = -(-n // chunks)
    return min(n, -(-per_chunk // 128) * 128)


def qdequant(
    w: Any, qtype: Any, n: int, k: int, *, row0: int, out: Any, out_is_bf16: bool = False
) -> Any:
    """Decode rows ``row0 .. row0 + out.shape[0]`` of the quantized [n, k] tensor
    ``w`` into ``out`` ([rows, k] float32, bfloat16 or float16, CuPy or torch CUDA),
    on the current stream.  ``out_is_bf16``: a CuPy uint16 ``out`` holds bf16 bits."""
    q = _qtype(qtype)
    cp = _cp()
    wc, _ = _as_cupy(w, "w")
    _check_w(wc, q, n, k)
    oc, ob = _as_cupy(out, "out", bf16_ok=True)
    if out_is_bf16:
        if oc.dtype not in (cp.uint16, cp.int16):
            raise ValueError(f"out_is_bf16=True needs out as uint16/int16 bf16 bits, got dtype {oc.dtype}")
        ob = True
    elif not ob and oc.dtype not in (cp.float32, cp.float16):
        raise ValueError(f"out must be float32, bfloat16 or float16, got dtype {oc.dtype}")
    if oc.ndim != 2 or int(oc.shape[1]) != k or not oc.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous [rows, {k}] array, got shape {tuple(oc.shape)}")
    rows = int(oc.shape[0])
    if not (0 <= row0 and 0 < rows and row0 + rows <= n):
        raise ValueError(f"rows {row0}..{row0 + rows} are outside the tensor's [0, {n}) rows")
    dev = _check_device({"w": wc, "out": oc})
    if DEQUANT_UNROLL not in _DEQUANT_UNROLLS:
        raise ValueError(f"DEQUANT_UNROLL={DEQUANT_UNROLL} must be one of {_DEQUANT_UNROLLS}")
    with cp.cuda.Device(dev):
        units = k // 16
        grid = max(1, min(-(-rows * units // (256 * DEQUANT_UNROLL)), DEQUANT_CTAS_PER_SM * sm_count(dev)))
        ot = X_BF16 if ob else X_F16 if oc.dtype == cp.float16 else X_F32
        fn = _kernel(q, f"dequant_rows<{int(q)}, {ot}, {DEQUANT_UNROLL}>")
        fn((grid,), (256,), (wc, oc, cp.int32(rows), cp.int32(k), cp.int64(row0)))
    return oc


def qembed(
    ids: Any, w: Any, qtype: Any, n: int, k: int, *, out: Any = None, check_ids: bool = True
) -> Any:
    """Rows ``ids`` of the quantized [n, k] table ``w``, decoded: float32 [M, k].

    ids: 1-D int32/int64 (CuPy or torch CUDA).  Every id must be in [0, n): checked
    (one device reduction and a host sync) before the gather launches, unless
    ``check_ids=False`` says the caller validated them already (the teachers check
    ids on the host, so their forward has no sync and can be captured in a graph).
    """
    q = _qtype(qtype)
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} must be a positive int (row length of W)")
    cp = _cp()
    ic, _ = _as_cupy(ids, "ids")
    wc, _ = _as_cupy(w, "w")
    _check_w(wc, q, n, k)
    if ic.ndim != 1:
        raise ValueError(f"ids must be 1-D [M], got shape {tuple(ic.shape)}")
    if ic.dtype not in (cp.int32, cp.int64):
        raise ValueError(f"ids must be int32 or int64, got dtype {ic.dtype}")
    m = int(ic.shape[0])
    if m < 1:
        raise ValueError("ids is empty (M=0)")
    if m > 65535:
        raise ValueError(f"ids has M={m} rows; at most 65535 per call")
    ic = cp.ascontiguousarray(ic)
    arrs = {"ids": ic, "w": wc}
    if out is not None:
        oc, _ = _as_cupy(out, "out")
        if oc.dtype != cp.float32 or tuple(oc.shape) != (m, k) or not oc.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 [{m}, {k}] array")
        arrs["out"] = oc
    dev = _check_device(arrs)
    with cp.cuda.Device(dev):
        lo, hi = (int(ic.min()), int(ic.max())) if check_ids else (0, 0)
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"ids contains {bad}, outside the table's [0, {n}) rows")
        y = arrs.get("out")
        if y is None:
            y = cp.empty((m, k), dtype=cp.float32)
        units = k // 16
        gx = max(1, min(-(-units // 256), 64))
        fn = _kernel(q, f"embed<{int(q)}, {_b(ic.dtype == cp.int64)}>")
        fn((gx, m), (256,), (wc, ic, y, cp.int32(m), cp.int32(n), cp.int32(k)))
    return y
