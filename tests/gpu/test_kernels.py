"""CUDA kernels (cupy_kernels.launch) against gguf.quants.dequantize + a float64
host matmul.  CUDA only: skipped with the reason elsewhere (see conftest.py).

Error bounds, relative Frobenius error ||out - ref|| / ||ref||, ref in float64
from the very activations the kernel saw (bf16 activations are compared with
their bf16 values, so the difference between F32 and BF16 inputs lives in the
reference, not in the bound):

* GEMV and embedding: weights are decoded in float32 exactly as gguf does
  (tests/gpu/test_dequant_host.py checks that to the last bit on the host), so
  the only error is float32 accumulation in a different order: about
  sqrt(K) * 2^-24 ~ 2e-6 at K = 896.  Bound GEMV_TOL = 1e-5; embedding 1e-6
  (no accumulation at all: values must equal gguf's).
* tensor-core GEMV (bf16 x, K-quants): weights enter as exact small integers
  in bf16 (tests/gpu/test_qfrag_host.py checks the decode on the host), bf16 x
  is used as is, mma products are exact and accumulate in float32, and the
  scale/min apply in float32 per 16-32 weights: the same accumulation-noise
  bound GEMV_TOL.  The FOLD variant (and gemv1_tc) accumulate 128 + q instead
  of q, which costs a few bits (measured <= 1.1e-6 against <= 4e-7), still far
  under GEMV_TOL.
* tensor-core GEMM: weights (and F32 activations) are rounded to bf16 (unit
  roundoff 2^-9) before an exact-product, float32-accumulated mma.  Each
  rounding is a uniform relative error of rms 2^-9/sqrt(3) = 1.1e-3, so a
  random-sign dot product lands at ~1.1e-3 relative (BF16 x: one rounding) to
  ~1.6e-3 (F32 x: two).  Bound MMA_TOL = 6e-3, under the 1e-2 at which a
  wrong scale or a dropped sub-block would still hide.
* the same with f16 x (the Q4K teacher's default): x is used as is and only the
  weights round to f16 (unit roundoff 2^-11, rms 2.8e-4 relative).  Bound
  F16_TOL = 6e-4, under what bf16 tiles would give (~1.1e-3), so a kernel that
  silently ran bf16 fails it.  The GEMVs take f16 x as float32 (exact).
* the Hopper wgmma GEMM (Q4_K and Q6_K, f16 x only): it decodes in f16
  arithmetic, so d*sc (and dmin*m) each round to f16 and the multiply (or fused
  multiply-add) rounds once more (two to three f16 roundings per weight instead
  of one).  Bound WGMMA_TOL = 1e-3, still an order under what a wrong scale or
  sub-block gives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from .blocks import LAYOUT, random_weight

GEMV_TOL = 1e-5
MMA_TOL = 6e-3
F16_TOL = 6e-4
WGMMA_TOL = 1e-3
EMBED_TOL = 1e-6

FORMATS = list(LAYOUT)


def _k_for(qt: T, big: bool = False) -> int:
    qk = LAYOUT[qt][0]
    if qk == 256:
        return 768 if big else 512
    if qk == 32:
        return 352 if big else 160  # 352 = 2.75 GEMM K-steps: a partial last step
    return 208 if big else 48  # 16-value blocks: 208 = 1.625 K-steps


@pytest.fixture(scope="module")
def cp() -> Any:
    import cupy

    return cupy


@pytest.fixture()
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    # fresh inputs per test, reproducible from the test id
    return np.random.default_rng(abs(hash(request.node.nodeid)) % 2**32)


def _x(rng: np.random.Generator, m: int, k: int, bf16: bool | str) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(np.float32)
    if bf16 == "f16":
        return x.astype(np.float16).astype(np.float32)
    if bf16:  # round to nearest even to bf16, keep as float32 values
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        x = r.astype(np.uint32).view(np.float32)
    return x


def _to_device_x(cp: Any, x: np.ndarray, bf16: bool | str) -> Any:
    """CuPy f32, or a torch bf16 / f16 CUDA tensor (the DLPack path)."""
    if not bf16:
        return cp.asarray(x)
    import torch

    return torch.from_numpy(x).to("cuda").to(torch.float16 if bf16 == "f16" else torch.bfloat16)


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


def _run_matmul(
    cp: Any, qt: T, m: int, n: int, k: int, bf16: bool | str, path: str, rng: np.random.Generator
) -> float:
    from cupy_kernels.launch import qmatmul

    raw, deq = random_weight(qt, n, k, rng)
    x = _x(rng, m, k, bf16)
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    out = cp.full((m, n), cp.nan, dtype=cp.float32)  # poison: every element must be written
    y = qmatmul(_to_device_x(cp, x, bf16), cp.asarray(raw), qt, n, k, out=out, path=path)
    assert y is out
    got = cp.asnumpy(y)
    assert np.isfinite(got).all(), f"{int((~np.isfinite(got)).sum())} outputs not written"
    return _rel(got, ref)


@pytest.mark.parametrize("bf16", [False, True, "f16"], ids=["x_f32", "x_bf16", "x_f16"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_gemv(cp: Any, rng: np.random.Generator, qt: T, m: int, bf16: bool | str) -> None:
    # N = 77: odd, not a multiple of the 2-row warp or the 8-warp block
    err = _run_matmul(cp, qt, m, 77, _k_for(qt, big=True), bf16, "gemv", rng)
    print(f"gemv {qt.name} M={m} bf16={bf16}: rel err {err:.3g}")
    assert err < GEMV_TOL


@pytest.mark.parametrize("bf16", [False, True, "f16"], ids=["x_f32", "x_bf16", "x_f16"])
@pytest.mark.parametrize("m,n", [(7, 200), (61, 129), (257, 300), (1, 131)])
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_mma(cp: Any, rng: np.random.Generator, qt: T, m: int, n: int, bf16: bool | str) -> None:
    # N not a multiple of the 128 tile, prime M, M = 1 through the tile path
    err = _run_matmul(cp, qt, m, n, _k_for(qt, big=True), bf16, "mma", rng)
    print(f"mma {qt.name} M={m} N={n} bf16={bf16}: rel err {err:.3g}")
    assert err < (F16_TOL if bf16 == "f16" else MMA_TOL)


@pytest.mark.parametrize("bf16", [False, True, "f16"], ids=["x_f32_tf32", "x_bf16", "x_f16"])
@pytest.mark.parametrize("m", [9, 257])
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_dequant_cublas(cp: Any, rng: np.random.Generator, qt: T, m: int, bf16: bool | str) -> None:
    # a scratch of 128 rows forces chunks of 128, 128, 44 rows over N = 300;
    # f32 x runs TF32 (unit roundoff 2^-11, under the bf16 bound)
    from cupy_kernels import launch

    saved = launch.DEQUANT_SCRATCH_BYTES
    launch.DEQUANT_SCRATCH_BYTES = 1
    try:
        err = _run_matmul(cp, qt, m, 300, _k_for(qt, big=True), bf16, "dequant", rng)
    finally:
        launch.DEQUANT_SCRATCH_BYTES = saved
    print(f"dequant {qt.name} M={m} bf16={bf16}: rel err {err:.3g}")
    assert err < (F16_TOL if bf16 == "f16" else MMA_TOL)


def _need_hopper(cp: Any) -> None:
    from cupy_kernels import launch

    if not launch.is_hopper(int(cp.cuda.runtime.getDevice())):
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (H100 / H200)")


# M: one tile of 64, a partial tile of 128, two tiles, Q4_K's 256-token tiles (257: a partial
# one of 256, Q6_K two of 128 and one of 1; 513: two whole and a partial; x then moves in 8-row
# TMA boxes, at 320 in 64-row ones, 4 a whole tile); N: partial row tiles; K = 3584:
# 28 Q4_K / 14 Q6_K slots, split over CTAs where the grid is small (atomic float32
# sums).  Q6_K rows of 420 / 630 / 2,940 bytes (K = 512 / 768 / 3584) put the 210-byte
# blocks at every even offset within their 16-byte pieces.
WGMMA_FORMATS = [T.Q4_K, T.Q6_K]


@pytest.mark.parametrize("m,n,k", [(33, 200, 512), (64, 130, 768), (100, 384, 3584), (257, 131, 768),
                                   (320, 256, 768), (64, 512, 3584), (12, 77, 3584), (513, 384, 768)])
@pytest.mark.parametrize("qt", WGMMA_FORMATS, ids=lambda q: q.name)
def test_wgmma(cp: Any, rng: np.random.Generator, qt: T, m: int, n: int, k: int) -> None:
    _need_hopper(cp)
    err = _run_matmul(cp, qt, m, n, k, "f16", "wgmma", rng)
    print(f"wgmma {qt.name} M={m} N={n} K={k}: rel err {err:.3g}")
    assert err < WGMMA_TOL


@pytest.mark.parametrize("m,n,sms", [(300, 4608, None), (200, 3584, None), (256, 15360, None), (512, 18944, None),
                                     (64, 512, 7), (64, 1000, 7)])
@pytest.mark.parametrize("qt", WGMMA_FORMATS, ids=lambda q: q.name)
def test_wgmma_f16_out(
    cp: Any, rng: np.random.Generator, qt: T, m: int, n: int, sms: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f16 y written by the kernel itself (one tile per CTA, whole tiles, or split tiles
    summed in the kernel), against the float64 product; a K-split grid larger than the GPU
    (as if it had 7 SMs, stream-K off) adds atomically and refuses an f16 y by name."""
    import torch

    from cupy_kernels import launch

    _need_hopper(cp)
    if sms is not None:
        monkeypatch.setattr(launch, "sm_count", lambda dev: sms)
        monkeypatch.setattr(launch, "WGMMA_STREAM_K", False)
    k = 3584
    dev = int(cp.cuda.runtime.getDevice())
    plan = launch.wgmma_plan(m, n, k, launch.sm_count(dev), qt)
    assert plan.atomics == (sms is not None), plan
    raw, deq = random_weight(qt, n, k, rng)
    x = torch.from_numpy(_x(rng, m, k, "f16")).to("cuda").half()
    w = cp.asarray(raw)
    y16 = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    if launch.wgmma_writes_f16(m, n, k, launch.sm_count(dev), qt):
        launch.qmatmul(x, w, qt, n, k, out=y16, path="wgmma")
        ref = x.double().cpu().numpy() @ deq.astype(np.float64).T
        got = y16.float().cpu().numpy()
        assert np.isfinite(got).all()
        err = _rel(got, ref)
        print(f"wgmma {qt.name} f16 out M={m} N={n} {plan}: rel err {err:.3g}")
        assert err < WGMMA_TOL
    else:
        with pytest.raises(ValueError, match="out must be float32"):
            launch.qmatmul(x, w, qt, n, k, out=y16, path="wgmma")
        err = _run_matmul(cp, qt, m, n, k, "f16", "wgmma", rng)  # float32 y, zeroed, atomics
        print(f"wgmma {qt.name} atomics M={m} N={n} {plan}: rel err {err:.3g}")
        assert err < WGMMA_TOL


@pytest.mark.parametrize("m,n,k", [(100, 384, 3584), (64, 512, 3584), (64, 1000, 3584), (300, 1000, 3584)])
@pytest.mark.parametrize("qt", WGMMA_FORMATS, ids=lambda q: q.name)
def test_wgmma_stream_k(
    cp: Any, rng: np.random.Generator, qt: T, m: int, n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream-K as if the GPU had 7 SMs: 7 CTAs, each an equal run of (tile, ring slot)
    units, so runs start and end inside tiles and cross from one tile to the next, the
    ring running on across them; the CTA that runs a tile's last slot adds the others'
    parts from the workspace in a fixed order: float32 and f16 y agree, a second run is
    bitwise the same, and the workspace's flags are left zeroed."""
    import torch

    from cupy_kernels import launch

    _need_hopper(cp)
    monkeypatch.setattr(launch, "sm_count", lambda dev: 7)
    monkeypatch.setattr(launch, "WG_STREAM_K_GAIN", 100.0)  # take it wherever K would be split
    plan = launch.wgmma_plan(m, n, k, 7, qt)
    runs = [plan.cta_units(b) for b in range(plan.ctas)]
    assert plan.ctas == 7 and plan.fixup and any(u // plan.slots != (u1 - 1) // plan.slots for u, u1 in runs), plan
    err = _run_matmul(cp, qt, m, n, k, "f16", "wgmma", rng)
    print(f"wgmma stream-K {qt.name} M={m} N={n} K={k} {plan}: rel err {err:.3g}")
    assert err < WGMMA_TOL
    raw, deq = random_weight(qt, n, k, rng)
    x = torch.from_numpy(_x(rng, m, k, "f16")).to("cuda").half()
    w = cp.asarray(raw)
    ws = cp.zeros(launch.wgmma_workspace_bytes(7), dtype=cp.uint8)
    y32 = [launch.qmatmul(x, w, qt, n, k, path="wgmma", workspace=ws) for _ in range(2)]
    assert bool((y32[0] == y32[1]).all()), "the sum's order is fixed: two runs agree bitwise"
    assert int(cp.count_nonzero(ws[: 4 * plan.ctas])) == 0, "every flag is cleared by the CTA that read it"
    y16 = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    launch.qmatmul(x, w, qt, n, k, out=y16, path="wgmma", workspace=ws)
    assert bool(torch.equal(y16, torch.as_tensor(y32[0], device="cuda").half())), "f16 y is the f32 y rounded"
    ref = x.double().cpu().numpy() @ deq.astype(np.float64).T
    assert _rel(cp.asnumpy(y32[0]), ref) < WGMMA_TOL


@pytest.mark.parametrize("n,whole", [(128 * 14, True), (128 * 15, False)])
@pytest.mark.parametrize("qt", WGMMA_FORMATS, ids=lambda q: q.name)
def test_wgmma_one_cta_per_sm_on_many_tiles(
    cp: Any, rng: np.random.Generator, qt: T, n: int, whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole-tile grids of two waves or more, as if the GPU had 7 SMs: 7 CTAs, each running
    its tiles with the ring going on across them; 14 tiles give each CTA two whole tiles
    (plain stores), 15 split some tiles between CTAs (summed in the kernel)."""
    from cupy_kernels import launch

    _need_hopper(cp)
    monkeypatch.setattr(launch, "sm_count", lambda dev: 7)
    m, k = 64, 3584
    plan = launch.wgmma_plan(m, n, k, 7, qt)
    assert plan.ctas == 7 and plan.tiles == n // 128 and plan.whole_tiles == whole and not plan.one_tile_each
    err = _run_matmul(cp, qt, m, n, k, "f16", "wgmma", rng)
    print(f"wgmma one CTA per SM {qt.name} M={m} N={n} K={k} {plan}: rel err {err:.3g}")
    assert err < WGMMA_TOL


# The tall tile (Q4_K, 128 tokens x 256 weight rows, wgmma.cu's ROWS = 256), forced at every M.
# On the GPU's own SMs: a partial token tile and a partial row tile (K split over resident
# CTAs); three token tiles, the last of one row (8-row x boxes); the 7B FFN shape at 512 (one
# CTA per SM over 296 tiles, runs crossing tiles, split tiles summed in the kernel).  As if the
# GPU had 7 SMs: stream-K; a K-split grid larger than the GPU (atomics into a zeroed float32
# y, f16 refused); 12 whole tiles, one per CTA, more CTAs than SMs.
@pytest.mark.parametrize("m,n,k,mode", [(100, 296, 768, "gpu"), (257, 640, 3584, "gpu"), (512, 18944, 3584, "gpu"),
                                        (200, 512, 3584, "stream-k"), (200, 512, 3584, "atomics"),
                                        (300, 1000, 3584, "tiles")])
def test_wgmma_tall_tile(
    cp: Any, rng: np.random.Generator, m: int, n: int, k: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every output of the tall tile against the float64 product, float32 y and (where the plan
    lets the kernel write it) f16 y, which must be the float32 y rounded: the two 64-row groups
    of each MMA warpgroup, the 64-K steps and their quarter blocks, the 10-piece weight loader
    and the epilogues all take part."""
    import torch

    from cupy_kernels import launch

    _need_hopper(cp)
    monkeypatch.setattr(launch, "WGMMA_TALL", {int(T.Q4_K): (1, 1 << 20)})
    if mode != "gpu":
        monkeypatch.setattr(launch, "sm_count", lambda dev: 7)
    monkeypatch.setattr(launch, "WGMMA_STREAM_K", mode != "atomics")
    if mode == "stream-k":  # take it wherever K would be split
        monkeypatch.setattr(launch, "WG_STREAM_K_GAIN", 100.0)
    dev = int(cp.cuda.runtime.getDevice())
    plan = launch.wgmma_plan(m, n, k, launch.sm_count(dev), T.Q4_K)
    assert (plan.ntok, plan.rows) == (128, 256) and plan.tiles == -(-m // 128) * -(-n // 256), plan
    expect = {"stream-k": plan.fixup and plan.ctas == 7, "atomics": plan.atomics,
              "tiles": plan.one_tile_each and plan.ctas > 7, "gpu": plan.resident}
    assert expect[mode], (mode, plan)
    raw, deq = random_weight(T.Q4_K, n, k, rng)
    x = torch.from_numpy(_x(rng, m, k, "f16")).to("cuda").half()
    w = cp.asarray(raw)
    ws = cp.zeros(launch.wgmma_workspace_bytes(launch.sm_count(dev)), dtype=cp.uint8)
    y32 = cp.full((m, n), cp.nan, dtype=cp.float32)
    launch.qmatmul(x, w, T.Q4_K, n, k, out=y32, path="wgmma", workspace=ws)
    got = cp.asnumpy(y32)
    assert np.isfinite(got).all(), f"{int((~np.isfinite(got)).sum())} outputs not written ({plan})"
    ref = x.double().cpu().numpy() @ deq.astype(np.float64).T
    err = _rel(got, ref)
    print(f"wgmma tall M={m} N={n} K={k} {plan}: rel err {err:.3g}")
    assert err < WGMMA_TOL
    y16 = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    if plan.atomics:
        with pytest.raises(ValueError, match="out must be float32"):
            launch.qmatmul(x, w, T.Q4_K, n, k, out=y16, path="wgmma", workspace=ws)
        return
    launch.qmatmul(x, w, T.Q4_K, n, k, out=y16, path="wgmma", workspace=ws)
    want = torch.as_tensor(y32, device="cuda").half()
    assert bool(torch.equal(y16, want)), f"{int((y16 != want).sum())} f16 outputs differ from the f32 y rounded"
    assert int(cp.count_nonzero(ws[: 4 * plan.ctas])) == 0, "every flag is cleared by the CTA that read it"


def test_wgmma_refuses_what_it_cannot_run(cp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cupy_kernels import launch

    _need_hopper(cp)
    w = cp.zeros(256 // 256 * 144 * 128, dtype=cp.uint8)
    x16 = torch.zeros(40, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="needs float16 x"):
        launch.qmatmul(x16.bfloat16(), w, T.Q4_K, 128, 256, path="wgmma")
    w5 = cp.zeros(176 * 128, dtype=cp.uint8)
    with pytest.raises(ValueError, match="supports Q4_K, Q6_K, not Q5_K"):
        launch.qmatmul(x16, w5, T.Q5_K, 128, 256, path="wgmma")
    # stream-K on the whole GPU needs the workspace of wgmma_workspace_bytes(SMs)
    n, k = 18944, 3584
    assert launch.wgmma_plan(64, n, k, launch.sm_count(int(w.device.id))).fixup
    wide, x64 = cp.zeros(n * k // 256 * 144, dtype=cp.uint8), torch.zeros(64, k, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="workspace holds 16 bytes"):
        launch.qmatmul(x64, wide, T.Q4_K, n, k, path="wgmma", workspace=cp.zeros(16, dtype=cp.uint8))
    # ... and does not allocate its own while a graph is being captured
    monkeypatch.setattr(launch, "_wg_workspaces", {})
    y = cp.empty((64, n), dtype=cp.float32)
    xc = cp.zeros((64, k), dtype=cp.float16)  # from CuPy: a torch x would make the capture wait on torch's stream
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="captures a CUDA graph"):
                launch.qmatmul(xc, wide, T.Q4_K, n, k, out=y, path="wgmma")
        finally:
            s.end_capture()


@pytest.mark.parametrize("m", [40, 300])
@pytest.mark.parametrize("qt", WGMMA_FORMATS, ids=lambda q: q.name)
def test_wgmma_graph_replay_reads_new_x(cp: Any, rng: np.random.Generator, qt: T, m: int) -> None:
    """The wgmma GEMM reads x through a tensor map passed by value (it holds x's address):
    a captured CUDA graph must replay it on whatever x's buffer holds at replay time, as
    the teacher's graphs do, and give what an eager launch gives on the same x."""
    from cupy_kernels import launch

    _need_hopper(cp)
    n, k = 384, 768
    raw, _ = random_weight(qt, n, k, rng)
    w = cp.asarray(raw)
    x = cp.asarray(_x(rng, m, k, "f16")).astype(cp.float16)
    y = cp.zeros((m, n), dtype=cp.float32)
    ws = cp.zeros(launch.wgmma_workspace_bytes(launch.sm_count(int(w.device.id))), dtype=cp.uint8)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        launch.qmatmul(x, w, qt, n, k, out=y, path="wgmma", workspace=ws)
        graph = s.end_capture()
        graph.launch(s)
        s.synchronize()
        first = y.copy()
        x[...] = cp.asarray(_x(rng, m, k, "f16")).astype(cp.float16)
        graph.launch(s)
        s.synchronize()
        replayed = y.copy()
        eager = launch.qmatmul(x, w, qt, n, k, path="wgmma", workspace=ws)
        s.synchronize()
    assert not cp.array_equal(first, replayed), "the replay did not read x's new values"
    assert cp.array_equal(replayed, eager), float(cp.abs(replayed - eager).max())


@pytest.mark.parametrize("qt,k", [(T.Q4_K, 3584), (T.Q6_K, 3584), (T.Q8_0, 3520), (T.BF16, 3504)])
def test_auto_path_large_shape(cp: Any, rng: np.random.Generator, qt: T, k: int) -> None:
    # a 7B-like row length, both dispatch sides (M=8 GEMV, M=33/64 GEMM); the
    # small tile grid makes the GEMM split K over blocks (atomic adds), and
    # K=3520/3504 end on a partial K-step inside the last split
    for m, n, tol in ((8, 384, GEMV_TOL), (64, 384, MMA_TOL), (33, 200, MMA_TOL), (200, 300, MMA_TOL)):
        err = _run_matmul(cp, qt, m, n, k, True, "auto", rng)
        print(f"auto {qt.name} M={m} N={n} K={k}: rel err {err:.3g}")
        assert err < tol


@pytest.mark.parametrize("prefetch", [True, False], ids=["l2pf", "nopf"])
@pytest.mark.parametrize("shape", [(2, 2), (2, 4), (4, 2), (1, 4)], ids=lambda s: f"r{s[0]}u{s[1]}")
@pytest.mark.parametrize("qt", [T.Q4_K, T.Q6_K, T.Q4_0])
def test_gemv_variants(
    cp: Any, rng: np.random.Generator, qt: T, shape: tuple[int, int], prefetch: bool
) -> None:
    # every compiled (rows per warp, groups in flight) GEMV variant; K = 3584 and
    # 768 give loop trips with and without a remainder
    from cupy_kernels import launch

    saved = launch.GEMV_SMALL, launch.GEMV_PREFETCH
    launch.GEMV_SMALL, launch.GEMV_PREFETCH = shape, prefetch
    try:
        for m, k in ((1, 3584), (2, _k_for(qt, big=True))):
            err = _run_matmul(cp, qt, m, 131, k, False, "gemv", rng)
            assert err < GEMV_TOL
    finally:
        launch.GEMV_SMALL, launch.GEMV_PREFETCH = saved


@pytest.mark.parametrize("fold", [False, True], ids=["exact", "fold"])
@pytest.mark.parametrize("wpr", [None, 1, 2, 4, 8], ids=lambda w: f"wpr{w}")
@pytest.mark.parametrize("qt", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_gemv_tc(
    cp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, qt: T, wpr: int | None, fold: bool
) -> None:
    # the tensor-core GEMV (bf16 x, K-quants) in every K split, with and without
    # the folded bias; K = 3584 is 14 blocks, which 4 and 8 warps split unevenly;
    # N = 77 and 16 leave a partial 16-row tile and exactly one
    cases = ((1, 77, 3584), (2, 16, 768), (5, 77, 512), (8, 131, 3584))
    _check_tc(cp, rng, monkeypatch, qt, cases, GEMV_TC_WPR=wpr, GEMV_TC_FOLD=fold)


@pytest.mark.parametrize("qt", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_gemv_tc_column_tiles(cp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, qt: T) -> None:
    # M = 9..32 on the tensor-core GEMV: 2 or 4 column tiles share each decoded
    # fragment; M = 13 and 27 leave a partial tile, N = 77 a partial row tile
    cases = ((9, 77, 3584), (13, 16, 768), (16, 131, 3584), (27, 77, 512), (32, 131, 3584))
    _check_tc(cp, rng, monkeypatch, qt, cases)
    # every compiled tile count, including more tiles than M needs
    for nt in (2, 4, 8):
        _check_tc(cp, rng, monkeypatch, qt, ((9, 77, 3584),), GEMV_TC_NT=nt)


def _check_tc(
    cp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, qt: T,
    cases: tuple[tuple[int, int, int], ...], **settings: Any,
) -> None:
    """Each (M, N, K) case through path "gemv" with bf16 x and the given launch
    settings, M = 1 on the tensor cores too: within GEMV_TOL, and every case ran
    on the tensor-core GEMV."""
    from cupy_kernels import launch

    calls = _spy_gemv_tc(monkeypatch)
    monkeypatch.setattr(launch, "GEMV_TC_M1_MIN_WEIGHTS", {t: 0 for t in launch._TC_TYPES})
    for name, value in settings.items():
        monkeypatch.setattr(launch, name, value)
    for m, n, k in cases:
        err = _run_matmul(cp, qt, m, n, k, True, "gemv", rng)
        print(f"gemv_tc {qt.name} {settings} M={m} N={n} K={k}: rel err {err:.3g}")
        assert err < GEMV_TOL
    assert len(calls) == len(cases), "the tensor-core GEMV was not the kernel that ran"


def _spy_gemv_tc(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the launches that go through launch._gemv_tc (the tensor-core GEMVs)."""
    from cupy_kernels import launch

    calls: list[int] = []
    real = launch._gemv_tc

    def spy(*a: Any) -> None:
        calls.append(1)
        real(*a)

    monkeypatch.setattr(launch, "_gemv_tc", spy)
    return calls


@pytest.mark.parametrize("m1", [True, False], ids=["gemv1", "gemv_tc"])
@pytest.mark.parametrize("wpr", [None, 1, 2, 4, 8], ids=lambda w: f"wpr{w}")
@pytest.mark.parametrize("qt", [T.Q4_K, T.Q6_K], ids=lambda q: q.name)
def test_gemv1_tc(
    cp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, qt: T, wpr: int | None, m1: bool
) -> None:
    # M = 1: the scale-groups-as-columns kernels (gemv1_tc, gemv1_tc_q6k) and the
    # general one, on a single 16-row tile, partial tiles, one block per row and
    # 14 blocks split unevenly; K = 768 (3 Q6_K blocks of 210 B) leaves rows
    # 2 bytes off 4-byte alignment, so both halves of the funnel loads run;
    # K = 18944 (74 blocks, the 7B down projection) gives long K splits
    cases = ((1, 16, 256), (1, 77, 3584), (1, 1000, 768), (1, 19, 3584), (1, 40, 18944))
    _check_tc(cp, rng, monkeypatch, qt, cases, GEMV_TC_WPR=wpr, GEMV_TC_M1=m1)


def test_q6k_m1_dispatch(cp: Any, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    # Q6_K at M = 1 runs the tensor-core GEMV from GEMV_TC_M1_MIN_WEIGHTS[Q6_K]
    # weights (N * K) on and the float GEMV below; both exact
    from cupy_kernels import launch

    calls = _spy_gemv_tc(monkeypatch)
    k = 3584
    at_min = -(-launch.GEMV_TC_M1_MIN_WEIGHTS[int(T.Q6_K)] // k)
    for n, want in ((at_min, 1), (at_min - 1, 0), (100, 0)):
        calls.clear()
        err = _run_matmul(cp, T.Q6_K, 1, n, k, True, "gemv", rng)
        assert err < GEMV_TOL
        assert len(calls) == want, f"N={n}: tensor-core GEMV ran {len(calls)} times, expected {want}"


@pytest.mark.parametrize("id64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("qt", FORMATS, ids=lambda q: q.name)
def test_embed(cp: Any, rng: np.random.Generator, qt: T, id64: bool) -> None:
    from cupy_kernels.launch import qembed

    n, k = 300, _k_for(qt, big=True)
    raw, deq = random_weight(qt, n, k, rng)
    ids = rng.integers(0, n, size=37)
    ids[:3] = [0, n - 1, ids[5]]  # both ends and a duplicate
    ids_d = cp.asarray(ids.astype(np.int64 if id64 else np.int32))
    out = cp.full((ids.size, k), cp.nan, dtype=cp.float32)
    qembed(ids_d, cp.asarray(raw), qt, n, k, out=out)
    got = cp.asnumpy(out)
    assert np.isfinite(got).all()
    err = _rel(got, deq[ids].astype(np.float64))
    assert err < EMBED_TOL


def test_torch_inputs_zero_copy(cp: Any) -> None:
    import torch

    from cupy_kernels.launch import _as_cupy

    t = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    a, is_bf16 = _as_cupy(t, "x", bf16_ok=True)
    assert is_bf16 and a.data.ptr == t.data_ptr()
    w = torch.randint(0, 255, (100,), device="cuda", dtype=torch.uint8)
    b, _ = _as_cupy(w, "w")
    assert b.data.ptr == w.data_ptr()


def test_bad_arguments_raise_before_launch(cp: Any) -> None:
    import torch

    from cupy_kernels.launch import qembed, qmatmul

    n, k = 16, 512
    w = cp.zeros(n * k // 256 * 144, dtype=cp.uint8)
    x = cp.ones((2, k), dtype=cp.float32)
    out = cp.full((2, n), 7.0, dtype=cp.float32)
    cases: list[tuple[str, Any]] = [
        ("k=500", lambda: qmatmul(cp.ones((2, 500), cp.float32), w, T.Q4_K, n, 500, out=out)),
        ("float64", lambda: qmatmul(x.astype(cp.float64), w, T.Q4_K, n, k, out=out)),
        ("K=256 columns", lambda: qmatmul(x[:, :256], w, T.Q4_K, n, k, out=out)),
        ("needs", lambda: qmatmul(x, w[:-1], T.Q4_K, n, k, out=out)),
        ("CUDA tensor", lambda: qmatmul(torch.ones(2, k), w, T.Q4_K, n, k, out=out)),
        ("not supported", lambda: qmatmul(x, w, T.IQ2_XXS, n, k, out=out)),
        ("outside", lambda: qembed(cp.asarray([0, n]), w, T.Q4_K, n, k)),
        ("M <= 8", lambda: qmatmul(cp.ones((9, k), cp.float32), w, T.Q4_K, n, k, path="gemv")),
    ]
    for needle, call in cases:
        with pytest.raises(ValueError, match=needle):
            call()
    assert bool((out == 7.0).all()), "a rejected call wrote to out"


# ---------------------------------------------------------------- real model tensors

REAL = {
    "smollm2-135m": "Q4K_MODEL_SMOLLM2_135M",
    "gemma3-270m": "Q4K_MODEL_GEMMA3_270M",
}


def _real_path(name: str) -> Path | None:
    env = os.environ.get(REAL[name])
    if env and Path(env).is_file():
        return Path(env)
    try:
        from teacher.models import resolve_model  # the teacher package's resolver, if built

        return Path(resolve_model(name))
    except Exception:
        return None


@pytest.mark.parametrize("model", list(REAL))
def test_real_model_tensors(cp: Any, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    path = _real_path(model)
    if path is None:
        pytest.skip(f"NOT RUN: {model} GGUF not available here (set ${REAL[model]})")
    from gguf import GGUFReader

    from cupy_kernels import launch
    from cupy_kernels.launch import SUPPORTED, qembed, qmatmul

    # bf16 x at M = 1 runs the K-quants on the tensor-core GEMVs whatever the size
    monkeypatch.setattr(launch, "GEMV_TC_M1_MIN_WEIGHTS", {t: 0 for t in launch._TC_TYPES})
    tc_calls = _spy_gemv_tc(monkeypatch)

    rng = np.random.default_rng(0)
    seen: set[T] = set()
    reader = GGUFReader(str(path))
    from gguf import quants

    for t in reader.tensors:
        qt = T(int(t.tensor_type))
        if qt not in SUPPORTED or qt in seen or len(t.shape) != 2:
            continue
        seen.add(qt)
        k, n = int(t.shape[0]), int(t.shape[1])  # GGUF lists ne0 (row length) first
        n_use = min(n, 4096)  # a slice of rows keeps the host reference fast
        raw = np.ascontiguousarray(np.asarray(t.data).view(np.uint8).reshape(n, -1)[:n_use])
        deq = quants.dequantize(raw, qt).reshape(n_use, k).astype(np.float64)
        w = cp.asarray(raw)
        for m, path_, tol in ((1, "gemv", GEMV_TOL), (33, "mma", MMA_TOL)):
            x = rng.standard_normal((m, k)).astype(np.float32)
            out = cp.full((m, n_use), cp.nan, dtype=cp.float32)
            qmatmul(cp.asarray(x), w, qt, n_use, k, out=out, path=path_)
            err = _rel(cp.asnumpy(out), x.astype(np.float64) @ deq.T)
            print(f"{model} {t.name} {qt.name} [{n_use},{k}] M={m} {path_}: rel err {err:.3g}")
            assert err < tol, t.name
        if k % 16 == 0:  # bf16 activations: the tensor-core GEMV for K-quants
            xb = _x(rng, 1, k, True)
            tc_calls.clear()
            out = cp.full((1, n_use), cp.nan, dtype=cp.float32)
            qmatmul(_to_device_x(cp, xb, True), w, qt, n_use, k, out=out, path="gemv")
            err = _rel(cp.asnumpy(out), xb.astype(np.float64) @ deq.T)
            print(f"{model} {t.name} {qt.name} [{n_use},{k}] M=1 bf16 (tc: {bool(tc_calls)}): rel err {err:.3g}")
            assert err < GEMV_TOL, t.name
            assert bool(tc_calls) == (int(qt) in launch._TC_TYPES), t.name
        ids = cp.asarray(rng.integers(0, n_use, size=9))
        emb = cp.asnumpy(qembed(ids, w, qt, n_use, k))
        assert _rel(emb, deq[cp.asnumpy(ids)]) < EMBED_TOL
    assert seen, f"no supported 2-D tensor in {path}"
