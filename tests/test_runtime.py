"""The forward's runtime on CPU: logits dtypes, the chunked lm_head, bf16 / f16 activations
(and the f16-overflow fallback),
and the host-side kernel dispatch rules (no CUDA needed for any of these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from teacher.dequant_teacher import DenseOps, DequantTeacher
from teacher.forward import apply_rope, matmul_into, rms_norm, rope_for
from teacher.models import resolve_model
from teacher.runtime import frozen_chunks, logits_dtype


@pytest.fixture(scope="module")
def tiny() -> DequantTeacher:
    return DequantTeacher.from_gguf(resolve_model("tiny"))


def _bf16_twin(t: DequantTeacher) -> DequantTeacher:
    ops = DenseOps({n: t.ops._get(n) for n in t.ops.names()}, dtype=torch.bfloat16)
    return DequantTeacher(t.cfg, ops)


def _ids(t: DequantTeacher, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, t.native_vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_dtype_names_and_refusal() -> None:
    assert logits_dtype("float32") is torch.float32
    assert logits_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("float16", torch.float64, "fp8"):
        with pytest.raises(ValueError, match="float32, bfloat16"):
            logits_dtype(bad)


@pytest.mark.parametrize("chunk", [1, 7, 96])
def test_logit_chunks_tile_the_full_logits(tiny: DequantTeacher, chunk: int) -> None:
    ids = _ids(tiny, (3, 32))
    full = tiny.logits_for_batch(ids).reshape(-1, tiny.vocab_size())
    rows = 0
    for r0, part in tiny.logit_chunks(ids, chunk_tokens=chunk, dtype="float32"):
        assert r0 == rows and part.shape == (min(chunk, full.shape[0] - r0), tiny.vocab_size())
        torch.testing.assert_close(part, full[r0 : r0 + part.shape[0]], rtol=1e-5, atol=1e-5)
        rows += part.shape[0]
    assert rows == full.shape[0]


def test_logit_chunks_do_not_leak_no_grad(tiny: DequantTeacher) -> None:
    # the caller's student loss between chunks must still build a graph
    w = torch.ones(1, requires_grad=True)
    seen = 0
    for _, part in frozen_chunks(tiny.logit_chunks(_ids(tiny, (1, 8)), chunk_tokens=3)):
        assert torch.is_grad_enabled() and not part.requires_grad
        assert (part.float().sum() * w).requires_grad
        seen += 1
    assert seen == 3


def test_bf16_logits_dtype_and_truncation(tiny: DequantTeacher) -> None:
    cut = DequantTeacher(tiny.cfg, tiny.ops, target_vocab=tiny.native_vocab - 5)
    out = cut.logits_for_batch(_ids(tiny, (2, 5)), dtype="bfloat16")
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, tiny.native_vocab - 5)


def test_bf16_activations_track_the_f32_forward(tiny: DequantTeacher) -> None:
    # the forward in bf16 (norms and residual in float32) stays close to float32, and a
    # float32 forward is not accidentally run in bf16 (it would not match to 1e-5)
    ids = _ids(tiny, (2, 24), seed=1)
    ref = tiny.logits_for_batch(ids).double()
    bf = _bf16_twin(tiny).logits_for_batch(ids).double()
    cos = torch.nn.functional.cosine_similarity(ref, bf, dim=-1)
    assert float(cos.min()) > 0.999
    assert float((ref - bf).abs().max()) > 1e-5, "the bf16 forward computed in float32"


def _twin(t: DequantTeacher, dtype: torch.dtype, scale: dict[str, float] | None = None) -> DequantTeacher:
    scale = scale or {}
    ops = DenseOps({n: t.ops._get(n) * scale.get(n, 1.0) for n in t.ops.names()}, dtype=dtype)
    return DequantTeacher(t.cfg, ops)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def test_f16_activations_track_the_f32_forward_closer_than_bf16(tiny: DequantTeacher) -> None:
    # why the Q4K teacher runs f16: three more mantissa bits at the matmul inputs
    ids = _ids(tiny, (2, 48), seed=3)
    ref = tiny.logits_for_batch(ids)
    f16 = _min_cos(_twin(tiny, torch.float16).logits_for_batch(ids), ref)
    bf16 = _min_cos(_twin(tiny, torch.bfloat16).logits_for_batch(ids), ref)
    assert f16 >= 0.99999 and 1 - f16 < (1 - bf16) / 4, (f16, bf16)


def test_f16_overflow_falls_back_to_bf16(tiny: DequantTeacher, caplog: pytest.LogCaptureFixture) -> None:
    # a norm weight that puts the FFN input past f16's range (65504); f32 and bf16 hold
    # it (the weight is a float32 vector, so the weights themselves stay representable)
    big = {"blk.0.ffn_norm.weight": 1e6}
    ids = _ids(tiny, (1, 16), seed=4)
    ref = _twin(tiny, torch.float32, big).logits_for_batch(ids)
    assert torch.isfinite(ref).all()
    plain = _twin(tiny, torch.float16, big)
    assert not torch.isfinite(plain.logits_for_batch(ids)).all()  # the control: it does overflow

    guarded = _twin(tiny, torch.float16, big)
    guarded.runner.overflow_fallback = torch.bfloat16
    with caplog.at_level("WARNING", logger="teacher.runtime"):
        out = guarded.logits_for_batch(ids)
    assert torch.isfinite(out).all() and guarded.ops.dtype == torch.bfloat16
    assert "float16 activations overflowed" in caplog.text and "bfloat16" in caplog.text
    assert _min_cos(out, ref) > 0.99
    again = guarded.logits_for_batch(ids)  # later forwards keep the fallback
    torch.testing.assert_close(again, out)


def test_rms_norm_accumulates_in_float32() -> None:
    # bf16 input whose squares overflow bf16's precision: float32 accumulation keeps
    # the result equal to the float64 reference rounded once
    x = (torch.arange(1, 4097, dtype=torch.float32) * 37.0).reshape(1, -1).to(torch.bfloat16)
    w = torch.ones(4096)
    got = rms_norm(x, w, 1e-6, torch.float32)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert rms_norm(x, w, 1e-6).dtype == torch.bfloat16


def _textbook_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """RoPE as written in the papers: (x1 cos - x2 sin, x1 sin + x2 cos) on each pair."""
    d = 2 * cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    if style == "normal":
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out, rest), dim=-1)


@pytest.mark.parametrize("style", ["normal", "neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_apply_rope_is_bit_identical_to_the_textbook_form(style: str, dtype: torch.dtype) -> None:
    # the forward's four-kernel RoPE rounds each product before the sum, as the textbook
    # form does: FT-Q4K-TEACHER-006 is sensitive to a single ulp, so equal is the bar.
    # Half of each 24-dim head is rotated (partial rotary keeps the rest as is)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 33, 3, 24, generator=g) * 4).to(dtype)
    ang = torch.arange(33.0)[:, None] * torch.logspace(0, -3, 6)[None, :]
    want = _textbook_rope(x, ang.cos(), ang.sin(), style)
    got = apply_rope(x, rope_for(ang.cos(), ang.sin(), style, dtype), style)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(got[..., 12:], x[..., 12:]) and not torch.equal(got[..., :12], x[..., :12])


def test_vectors_are_cast_once_per_dtype() -> None:
    # a bias is added at every forward: its cast to the activation dtype is kept, not redone
    b = torch.tensor([1.0, 1 + 2.0**-12, -3.5])
    ops = DenseOps({"blk.0.attn_q.bias": b}, dtype=torch.float16)
    first = ops.vector("blk.0.attn_q.bias", torch.float16)
    assert first.dtype == torch.float16 and torch.equal(first, b.half()) and not torch.equal(first.float(), b)
    assert ops.vector("blk.0.attn_q.bias", torch.float16) is first
    assert ops.vector("blk.0.attn_q.bias") is ops.vector("blk.0.attn_q.bias", torch.float32)
    assert torch.equal(ops.vector("blk.0.attn_q.bias"), b) and ops.vector("blk.0.attn_q.bias").dtype == torch.float32


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_matmul_into_writes_column_slices(out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g).to(torch.bfloat16)
    w = torch.randn(23, 16, generator=g).to(torch.bfloat16)
    out = torch.full((5, 23), float("nan"), dtype=out_dtype)
    matmul_into(x, ((n0, w[n0 : n0 + 8]) for n0 in range(0, 23, 8)), out)
    torch.testing.assert_close(out.float(), (x @ w.T).float(), rtol=1e-2, atol=1e-2)
    assert not out.isnan().any(), "a column slice was never written"


# ------------------------------------------------------------ kernel dispatch (host logic)


def test_dispatch_path_by_m() -> None:
    from cupy_kernels import launch

    q4 = (QT.Q4_K, 18944, 3584)
    assert launch.dispatch_path(1, *q4, x_is_bf16=True) == "gemv1_tc"
    assert launch.dispatch_path(8, *q4, x_is_bf16=True) == "gemv_tc"
    assert launch.dispatch_path(launch.GEMV_TC_MAX_M, *q4, x_is_bf16=True) == "gemv_tc"
    assert launch.dispatch_path(launch.GEMV_TC_MAX_M + 1, *q4, x_is_bf16=True) == "mma"
    assert launch.dispatch_path(launch.DEQUANT_MIN_M, *q4, x_is_bf16=True) == "dequant"
    # float32 x and formats without an integer fragment decode keep the float GEMV
    assert launch.dispatch_path(8, *q4, x_is_bf16=False) == "gemv"
    assert launch.dispatch_path(16, *q4, x_is_bf16=False) == "mma"
    assert launch.dispatch_path(16, QT.Q8_0, 3584, 3584, x_is_bf16=True) == "mma"
    # Q6_K at M = 1: the tensor cores only from GEMV_TC_M1_MIN_WEIGHTS weights on
    assert launch.dispatch_path(1, QT.Q6_K, 3584, 3584, x_is_bf16=True) == "gemv"
    assert launch.dispatch_path(1, QT.Q6_K, 18944, 3584, x_is_bf16=True) == "gemv1_tc"
    with pytest.raises(ValueError, match="not supported"):
        launch.dispatch_path(4, QT.IQ2_XXS, 256, 256, x_is_bf16=True)


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_dispatch_path_wgmma_needs_its_formats_f16_and_sm90(qt: QT) -> None:
    from cupy_kernels import launch

    q4 = (qt, 18944, 3584)
    on = {"x_is_f16": True, "hopper": True}
    lo, hi = launch.WGMMA_MIN_M[int(qt)], launch.WGMMA_MAX_M[int(qt)]
    assert launch.dispatch_path(lo, *q4, x_is_bf16=True, **on) == "wgmma"
    assert launch.dispatch_path(hi, *q4, x_is_bf16=True, **on) == "wgmma"
    assert launch.dispatch_path(lo - 1, *q4, x_is_bf16=True, **on) == "gemv_tc"
    # past WGMMA_MAX_M only large weights may stay on it (WGMMA_WIDE): an attention-sized one does not
    assert launch.dispatch_path(hi + 1, qt, 3584, 3584, x_is_bf16=True, **on) == "dequant"
    # each condition alone keeps the paths as before: the tensor-core GEMV up to
    # GEMV_TC_MAX_M (32), the fused mma GEMM above; so does a format without a wgmma decode
    mid = launch.GEMV_TC_MAX_M + 1
    for m, before in ((lo, "gemv_tc"), (mid, "mma")):
        assert launch.dispatch_path(m, *q4, x_is_bf16=True, x_is_f16=True) == before
        assert launch.dispatch_path(m, *q4, x_is_bf16=True, hopper=True) == before
        assert launch.dispatch_path(m, QT.Q5_K, 18944, 3584, x_is_bf16=True, **on) == before
    saved = launch.WGMMA
    launch.WGMMA = False
    try:
        assert launch.dispatch_path(lo, *q4, x_is_bf16=True, **on) == "gemv_tc"
        assert launch.dispatch_path(mid, *q4, x_is_bf16=True, **on) == "mma"
    finally:
        launch.WGMMA = saved


def test_dispatch_path_wgmma_past_its_max_m_only_for_large_q4k_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupy_kernels import launch

    q4 = int(QT.Q4_K)
    monkeypatch.setattr(launch, "WGMMA_WIDE", {q4: (300, 512, 1 << 26)})
    on = {"x_is_bf16": True, "x_is_f16": True, "hopper": True}
    ffn, head, attn = (18944, 3584), (152064, 3584), (3584, 3584)
    assert [launch.dispatch_path(m, QT.Q4_K, *ffn, **on) for m in (299, 300, 512, 513)] == [
        "dequant", "wgmma", "wgmma", "dequant"]
    assert launch.dispatch_path(512, QT.Q4_K, *head, **on) == "wgmma"
    assert launch.dispatch_path(400, QT.Q4_K, *attn, **on) == "dequant"  # below 2^26 weights
    assert launch.dispatch_path(400, QT.Q6_K, *ffn, **on) == "dequant"  # no range for Q6_K
    assert launch.dispatch_path(400, QT.Q4_K, *ffn, x_is_bf16=True, hopper=True) == "dequant"
    assert launch.dispatch_path(400, QT.Q4_K, *ffn, x_is_bf16=True, x_is_f16=True) == "dequant"


def test_wgmma_wide_ranges_start_past_wgmma_max_m() -> None:
    from cupy_kernels import launch

    for q, (lo, hi, weights) in launch.WGMMA_WIDE.items():
        assert q in launch.WGMMA_TYPES and launch.WGMMA_MAX_M[q] < lo <= hi and weights > 0, (q, lo, hi)


def _wg_segments(plan: Any, b: int) -> list[tuple[int, int, int]]:
    """(tile, first slot, slots) of CTA b's segments, as wgmma.cu's WgWork walks them."""
    u, u1 = plan.cta_units(b)
    out = []
    while u < u1:
        tile, s0 = divmod(u, plan.slots)
        n = min(plan.slots - s0, u1 - u)
        out.append((tile, s0, n))
        u += n
    return out


@pytest.mark.parametrize("qt,kslot", [(QT.Q4_K, 128), (QT.Q6_K, 256)], ids=["Q4_K", "Q6_K"])
@pytest.mark.parametrize("m,n,k", [(33, 130, 512), (64, 512, 3584), (64, 18944, 3584), (64, 3584, 18944),
                                   (128, 152064, 3584), (512, 18944, 3584), (1, 128, 256), (16, 3584, 3584),
                                   (129, 3584, 3584), (300, 512, 3584)])
def test_wgmma_plan_runs_every_unit_once_and_loads_the_sms_evenly(
    m: int, n: int, k: int, qt: QT, kslot: int
) -> None:
    from cupy_kernels import launch

    sms = 132
    plan = launch.wgmma_plan(m, n, k, sms, qt)
    mt, nt = -(-m // plan.ntok), -(-n // 128)
    assert plan.tiles == mt * nt and plan.slots == k // kslot and plan.ntok * (mt - 1) < m
    # the smallest compiled token tile that holds M, else the largest (256: Q4_K only)
    ntoks = launch._WG_NTOK[int(qt)]
    assert plan.ntok in ntoks and (plan.ntok >= m or plan.ntok == max(ntoks))
    assert all(t < m for t in ntoks if t < plan.ntok)
    assert (plan.ntok == 256) == (qt == QT.Q4_K and m > 128)
    # every (tile, slot) unit in exactly one CTA's segments; a segment stays in its tile
    seen = [[0] * plan.slots for _ in range(plan.tiles)]
    for b in range(plan.ctas):
        for tile, s0, cnt in _wg_segments(plan, b):
            assert 0 <= s0 and s0 + cnt <= plan.slots and cnt >= 1
            for s in range(s0, s0 + cnt):
                seen[tile][s] += 1
    assert all(c == 1 for row in seen for c in row)
    per_cta = [sum(c for _, _, c in _wg_segments(plan, b)) for b in range(plan.ctas)]
    assert max(per_cta) - min(per_cta) <= 1, "units spread evenly"
    # one whole tile per CTA, whole tiles per CTA, or work split so the waves are full /
    # the SMs evenly loaded
    segments = [_wg_segments(plan, b) for b in range(plan.ctas)]
    if plan.one_tile_each:
        assert all(sg == [(b, 0, plan.slots)] for b, sg in enumerate(segments))
    elif plan.whole_tiles:
        assert all(s0 == 0 and cnt == plan.slots for sg in segments for _, s0, cnt in sg)
    else:
        assert min(per_cta) >= 2 or plan.tiles * plan.slots < 2 * plan.ctas
        assert any(cnt != plan.slots for sg in segments for _, _, cnt in sg), "some tile is split"
    assert launch.wgmma_writes_f16(m, n, k, sms, qt) == (not plan.atomics and n % 8 == 0)
    assert plan.fixup == (not plan.whole_tiles and plan.ctas <= sms) and not (plan.fixup and plan.atomics)
    assert plan.atomics == (not plan.whole_tiles and plan.ctas > sms)
    # the kernel's order runs the same segments
    assert all(sorted(plan.cta_segments(b)) == sorted(sg) for b, sg in enumerate(segments))
    # with stream-K and persistence off the plan is the K-split grid: tiles x splits CTAs,
    # the last wave at least WGMMA_WAVE_FILL full unless no split count fills it more
    saved = launch.WGMMA_STREAM_K, launch.WG_PERSIST_WAVES
    launch.WGMMA_STREAM_K, launch.WG_PERSIST_WAVES = False, 0
    try:
        split = launch.wgmma_plan(m, n, k, sms, qt)
    finally:
        launch.WGMMA_STREAM_K, launch.WG_PERSIST_WAVES = saved
    assert split.ctas % split.tiles == 0
    nk, splits = plan.slots, split.ctas // split.tiles
    fill = split.ctas / (-(-split.ctas // sms) * sms)
    best = max(
        (t := split.tiles * -(-nk // -(-nk // s))) / (-(-t // sms) * sms) for s in range(1, max(1, nk // 2) + 1)
    )
    assert fill >= launch.WGMMA_WAVE_FILL or fill == pytest.approx(best), (fill, best)
    if plan.ctas != split.ctas and splits == 1:  # whole tiles on one CTA per SM: many waves
        assert plan.ctas == sms and plan.tiles >= launch.WG_PERSIST_WAVES * sms
    elif plan.ctas != split.ctas:  # stream-K: one CTA per SM, and predicted cheaper by the margin
        assert splits > 1 and plan.ctas == min(sms, plan.tiles * plan.slots // 2)

        def cost(c: int) -> int:
            return -(-c // sms) * (-(-(plan.tiles * plan.slots) // c) + launch.WG_CTA_SLOTS)

        assert cost(plan.ctas) <= launch.WG_STREAM_K_GAIN * cost(split.ctas)


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=["Q4_K", "Q6_K"])
@pytest.mark.parametrize("m,n,k,sms", [(512, 18944, 3584, 132), (512, 3584, 18944, 132), (64, 18944, 3584, 132),
                                       (16, 3584, 18944, 132), (100, 384, 3584, 7), (64, 128 * 15, 3584, 7),
                                       (300, 1000, 3584, 7)])
def test_wgmma_fixup_waits_only_for_earlier_ctas_that_publish_before_they_wait(
    m: int, n: int, k: int, sms: int, qt: QT
) -> None:
    """Split tiles summed in the kernel (WgWork's order, mirrored by cta_segments): a CTA
    publishes at most one partial tile, before any wait of its own, and the CTA that runs a
    tile's last slot waits for exactly the earlier CTAs that ran the rest of it, so no CTA
    ever waits for a later one (no deadlock while CTAs start in order)."""
    from cupy_kernels import launch

    if qt == QT.Q6_K and m > launch.WGMMA_MAX_M[int(qt)] and (m, n) != (512, 18944):
        m = launch.WGMMA_MAX_M[int(qt)]
    plan = launch.wgmma_plan(m, n, k, sms, qt)
    assert plan.fixup and plan.ctas <= sms, plan
    published: dict[int, int] = {}  # CTA -> the tile of its partial
    finishers = []
    for b in range(plan.ctas):
        segs = plan.cta_segments(b)
        role = ["whole" if c == plan.slots else "publish" if s0 + c < plan.slots else "finish" for _, s0, c in segs]
        assert role.count("publish") <= 1
        if "publish" in role:
            published[b] = segs[role.index("publish")][0]
            assert "finish" not in role[: role.index("publish")], (b, segs)
        finishers += [(b, tile, s0) for (tile, s0, _), r in zip(segs, role, strict=True) if r == "finish"]
    assert finishers, "some tile is split between CTAs"
    for b, tile, s0 in finishers:
        first = plan.cta_of(tile * plan.slots)
        assert first < b and plan.cta_of(tile * plan.slots + s0) == b
        assert all(published.get(c) == tile for c in range(first, b)), (b, tile)
    assert sorted(published) == sorted(c for b, tile, _ in finishers for c in range(plan.cta_of(tile * plan.slots), b))
    assert all(plan.cta_of(u) == b for b in range(plan.ctas) for u in range(*plan.cta_units(b)))


def test_wgmma_fixup_off_adds_every_split_tile_atomically(monkeypatch: pytest.MonkeyPatch) -> None:
    """WGMMA_FIXUP (the A/B's switch): off, the 1x512 FFN plan (stream-K) adds its split tiles
    into a zeroed float32 y and only one-tile-per-CTA grids write f16, as before it."""
    from cupy_kernels import launch

    for fixup in (True, False):
        monkeypatch.setattr(launch, "WGMMA_FIXUP", fixup)
        ffn = launch.wgmma_plan(512, 18944, 3584, 132)
        assert (ffn.fixup, ffn.atomics) == (fixup, not fixup), ffn
        assert launch.wgmma_writes_f16(512, 18944, 3584, 132) == fixup
        head = launch.wgmma_plan(512, 152064, 3584, 132)  # whole tiles, 18 a CTA: f32 before
        assert head.whole_tiles and not head.fixup and not head.atomics and not head.one_tile_each
        assert launch.wgmma_writes_f16(512, 152064, 3584, 132) == fixup
        few = launch.wgmma_plan(64, 128 * 240, 3584, 132)
        assert few.one_tile_each and launch.wgmma_writes_f16(64, 128 * 240, 3584, 132)


def test_wgmma_plan_takes_stream_k_where_the_split_grid_is_uneven() -> None:
    """Session 13's shapes: 148 tiles of 28 slots split 3 ways is 444 CTAs in 4 waves, 40
    slots on the busiest SM against 31.4 spread evenly; the lm_head's 1,188 whole tiles
    fill 9 waves and run 9 to a CTA, one CTA per SM."""
    from cupy_kernels import launch

    assert launch.wgmma_plan(64, 18944, 3584, 132).ctas == 132
    assert launch.wgmma_plan(16, 3584, 18944, 132).ctas == 132
    head = launch.wgmma_plan(64, 152064, 3584, 132)
    assert head.ctas == 132 and head.whole_tiles and not head.one_tile_each
    assert launch.wgmma_writes_f16(64, 152064, 3584, 132)  # whole tiles: f16 from registers
    few = launch.wgmma_plan(64, 128 * 240, 3584, 132)  # 240 tiles: two waves, the second 82 % full
    assert few.one_tile_each and launch.wgmma_writes_f16(64, 128 * 240, 3584, 132)


def test_every_wgmma_variant_fits_the_sm90_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each compiled wgmma GEMM asks for its ring's shared memory at launch; past the
    227 KiB an sm_90 block may have, the launch fails on the GPU only."""
    from cupy_kernels import launch

    assert all(rows == 128 for _, _, rows in launch._wg_variants().values()) or launch.WGMMA_TALL
    monkeypatch.setattr(launch, "WGMMA_TALL", {int(QT.Q4_K): (129, 512)})  # the tall tile's kernels too
    variants = launch._wg_variants()
    assert {q for q, _, _ in variants.values()} == set(launch.WGMMA_TYPES)
    assert {(q, nt, rows) for q, nt, rows in variants.values() if rows != 128} == {(int(QT.Q4_K), 128, 256)}
    for name, (qt, ntok, rows) in variants.items():
        smem = launch._wg_smem(ntok, qt, rows)
        kslot, wrow, _ = launch._WG_RING[qt]
        # at least two slots (the producer fills one while the other is consumed), and the
        # f16 epilogue's [ntok][rows + 8] tile fits in the ring
        assert 2 * (kslot * ntok * 2 + rows * wrow) < smem <= 227 * 1024, (name, smem)
        assert ntok * (rows + 8) * 2 <= smem, name
        assert (", 256>" in name) == (rows == 256), name
    # the tall tile's ring is four slots (wgmma.cu's WgCfg::STAGES)
    assert launch._wg_smem(128, QT.Q4_K, 256) == 4 * (128 * 128 * 2 + 256 * 80) + 1024 + 4 * 24


@pytest.mark.parametrize("m,n,k", [(100, 296, 768), (257, 18944, 3584), (512, 3584, 18944), (512, 152064, 3584),
                                   (384, 3584, 3584), (300, 1000, 3584)])
def test_wgmma_tall_plan_covers_each_unit_once(m: int, n: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over WGMMA_TALL's range the plan counts 128-token x 256-row tiles, runs every (tile, slot)
    unit in exactly one CTA and names the tall kernel; outside it the tiles stay 128 rows."""
    from cupy_kernels import launch

    monkeypatch.setattr(launch, "WGMMA_TALL", {int(QT.Q4_K): (m, m)})
    plan = launch.wgmma_plan(m, n, k, 132, QT.Q4_K)
    assert (plan.ntok, plan.rows) == (128, 256)
    assert plan.tiles == -(-m // 128) * -(-n // 256) and plan.slots == k // 128
    seen = [[0] * plan.slots for _ in range(plan.tiles)]
    for b in range(plan.ctas):
        for tile, s0, cnt in _wg_segments(plan, b):
            for s in range(s0, s0 + cnt):
                seen[tile][s] += 1
    assert all(c == 1 for row in seen for c in row)
    assert launch._wg_name(QT.Q4_K, plan.ntok, 2, plan.rows) == "wgmma_gemm<12, 128, 2, 256>"
    other = launch.wgmma_plan(m + 1, n, k, 132, QT.Q4_K)
    assert other.rows == 128 and launch._wg_name(QT.Q4_K, other.ntok, 2, other.rows).count(",") == 2
    assert launch.wgmma_plan(m, n, k, 132, QT.Q6_K).rows == 128  # Q6_K has no tall tile


@pytest.mark.parametrize("ntok", [64, 128, 256])
def test_wgmma_x_boxes_tile_each_token_tile_and_stop_near_m(ntok: int) -> None:
    """x's TMA boxes (wgmma.cu's XBOX rows) must tile a token tile exactly, each at a
    1,024-byte offset of its swizzle atom (8 rows of 128 bytes), and the copies of the last
    tile (whole boxes up to its last row) may read fewer than 64 rows past M, since rows past
    M cost TMA's time; full tiles take one box each."""
    from cupy_kernels import launch

    for m in range(1, 3 * ntok + 1):
        box = launch.wgmma_x_box_rows(m, ntok)
        assert 8 <= box <= ntok and ntok % box == 0 and box & (box - 1) == 0, (m, box)
        rest = m % ntok or ntok
        past_m = -(-rest // box) * box - rest
        assert 0 <= past_m < min(box, 64), (m, box, past_m)
        if m % ntok == 0:
            assert box == ntok, (m, box)


@pytest.mark.parametrize("qt", [QT.Q2_K, QT.Q3_K], ids=lambda q: q.name)
def test_q2_q3_dispatch_never_takes_a_tensor_core_gemv(qt: QT) -> None:
    """Q2_K/Q3_K have no integer fragment decode (qfrag.cuh): every M must land on a
    path compiled for them (float GEMV, mma, dequant), with bf16 x as with f32 x."""
    from cupy_kernels import launch

    assert qt in launch.SUPPORTED
    for bf16 in (True, False):
        paths = {launch.dispatch_path(m, qt, 18944, 3584, x_is_bf16=bf16) for m in range(1, 200)}
        assert paths == {"gemv", "mma", "dequant"}, paths
    # the same sweep for Q4_K does reach the tensor cores: the check above can fail
    assert "gemv_tc" in {launch.dispatch_path(m, QT.Q4_K, 18944, 3584, x_is_bf16=True) for m in (2, 8)}


@pytest.mark.parametrize("n,k", [(18944, 3584), (3584, 18944), (152064, 3584), (100, 256), (129, 512)])
def test_dequant_chunks_fit_the_budget_and_cover_w(n: int, k: int) -> None:
    from cupy_kernels import launch

    rows = launch.dequant_chunk_rows(n, k, 2)
    chunks = [min(rows, n - n0) for n0 in range(0, n, rows)]
    assert sum(chunks) == n
    assert rows == n or (rows % 128 == 0 and rows * k * 2 <= max(launch.DEQUANT_SCRATCH_BYTES, 128 * k * 2))
    # balanced: the last chunk is not a sliver next to the others
    assert chunks[-1] >= rows - 128 * len(chunks)


def test_bench_ratios_from_the_run(tmp_path: Path) -> None:
    from teacher.bench import _ratios, run_llama_bench

    fake = tmp_path / "llama-bench"
    fake.write_text(
        "#!/bin/sh\n"
        # one slow repetition: the mean (850) would flatter the ratio, the median does not
        'echo \'[{"n_prompt": 512, "n_gen": 0, "avg_ts": 850.0, "stddev_ts": 335.4, "n_batch": 2048,'
        ' "samples_ts": [1000.0, 250.0, 1000.0, 1000.0, 1000.0]},'
        ' {"n_prompt": 0, "n_gen": 16, "avg_ts": 50.0}]\'\n'
    )
    fake.chmod(0o755)
    llama = run_llama_bench(fake, tmp_path / "m.gguf", [512])
    assert llama["tokens_per_s"] == {512: 1000.0} and llama["avg_tokens_per_s"] == {512: 850.0}
    assert llama["statistic"] == "median of samples_ts"
    assert llama["cmd"][llama["cmd"].index("-r") + 1] == "5" and "-fa" in llama["cmd"]
    row = {"1x512": {"tokens_per_s": 2500.0}, "peak_gpu_gib_above_baseline": 6.0,
           "working_set_gib": 5.0, "peak_bf16_logits_gib": 5.5}
    dense = {"1x512": {"tokens_per_s": 2000.0}, "peak_gpu_gib_above_baseline": 18.0,
             "working_set_gib": 16.0, "peak_bf16_logits_gib": 16.5}
    r = _ratios({"backends": {"q4k": row, "dense-bf16": dense}, "llama_cpp": llama}, [(1, 512)])
    assert r["1x512_tokens_per_s_q4k_over_dense"] == pytest.approx(1.25)
    assert r["1x512_tokens_per_s_q4k_over_llama_cpp"] == pytest.approx(2.5)
    assert r["working_set_q4k_over_dense"] == pytest.approx(5 / 16)
    # a llama-bench that prints no samples: its mean, said so
    old = tmp_path / "old-llama-bench"
    old.write_text("#!/bin/sh\necho '[{\"n_prompt\": 512, \"n_gen\": 0, \"avg_ts\": 900.0}]'\n")
    old.chmod(0o755)
    llama_old = run_llama_bench(old, tmp_path / "m.gguf", [512], reps=3)
    assert llama_old["tokens_per_s"] == {512: 900.0} and llama_old["statistic"].startswith("avg_ts")
    with pytest.raises(ValueError, match="reps=0"):
        run_llama_bench(old, tmp_path / "m.gguf", [512], reps=0)
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'no GPU' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="status 3: no GPU"):
        run_llama_bench(broken, tmp_path / "m.gguf", [512])
    with pytest.raises(FileNotFoundError, match="not an executable"):
        run_llama_bench(tmp_path / "missing", tmp_path / "m.gguf", [512])


def test_profile_split_counts_each_kernel_once_in_its_range() -> None:
    from teacher.bench import split_gpu_time

    events = [  # (name, start us, end us) as the profiler lists GPU events
        ("matmul:dequant", 0.0, 100.0),
        ("void dequant_rows<12, true, 1>(...)", 0.0, 60.0),
        ("nvjet_sm90_gemm", 61.0, 100.0),
        ("attention", 120.0, 150.0),
        ("flash_fwd_kernel", 121.0, 149.0),
        ("elementwise_kernel", 160.0, 170.0),  # launched outside any range
        ("lm_head", 200.0, 260.0),
        ("nvjet_sm90_gemm", 200.0, 258.0),
    ]
    split = split_gpu_time(events)
    assert split["gpu_busy_ms"] == pytest.approx((60 + 39 + 28 + 10 + 58) / 1e3)
    assert split["gpu_ms_by_stage"] == pytest.approx(
        {"matmul:dequant": 0.099, "attention": 0.028, "unattributed": 0.010, "lm_head": 0.058})
    assert split["gpu_ms_matmul_by_kernel"] == pytest.approx(
        {"matmul:dequant decode": 0.060, "matmul:dequant gemm/other": 0.039, "lm_head gemm/other": 0.058})
    assert split["top_kernels"][0] == {"name": "nvjet_sm90_gemm", "count": 2, "ms": pytest.approx(0.097)}


def test_profile_takes_the_last_marked_call_and_only_its_gpu_events() -> None:
    # the first call under a new profiler pays its start-up: the graphed host gap comes
    # from the second call's range and the GPU events that start inside it
    from types import SimpleNamespace

    from teacher.bench import _CALL, _last_call

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name: str, start: float, end: float, device: torch.autograd.DeviceType) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [
        ev(_CALL, 0.0, 9000.0, cpu), ev("k", 3500.0, 8000.0, cuda),  # first call: 3.5 ms lead
        ev(_CALL, 10000.0, 15000.0, cpu), ev("k", 10300.0, 12000.0, cuda), ev("k", 12000.0, 14600.0, cuda),
        ev(_CALL, 10300.0, 14600.0, cuda),  # the range's own span on the GPU timeline: not a kernel
    ]
    wall_s, busy_ms = _last_call(SimpleNamespace(events=lambda: events))
    assert wall_s == pytest.approx(0.005) and busy_ms == pytest.approx(4.3)
    with pytest.raises(RuntimeError, match="no 'bench:call' range"):
        _last_call(SimpleNamespace(events=lambda: events[1:2]))


def test_f16_overflow_in_logit_chunks_falls_back_before_any_chunk(tiny: DequantTeacher) -> None:
    # the chunked head reads the overflow flag after its first chunk is queued: no f16
    # chunk may reach the caller, and the bf16 rerun yields every row once, in order
    big = {"blk.0.ffn_norm.weight": 1e6}
    ids = _ids(tiny, (2, 9), seed=5)
    guarded = _twin(tiny, torch.float16, big)
    guarded.runner.overflow_fallback = torch.bfloat16
    chunks = list(guarded.logit_chunks(ids, chunk_tokens=4, dtype="float32"))
    assert [r0 for r0, _ in chunks] == [0, 4, 8, 12, 16]
    got = torch.cat([c for _, c in chunks])
    assert torch.isfinite(got).all() and guarded.ops.dtype == torch.bfloat16
    torch.testing.assert_close(got, guarded.logits_for_batch(ids).reshape(got.shape))


def test_prefetch_runs_the_forward_once_for_its_ids(tiny: DequantTeacher, monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher.runtime as runtime

    calls: list[tuple[int, ...]] = []
    real = runtime.hidden_states

    def counted(cfg: object, ops: object, ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        return real(cfg, ops, ids)  # type: ignore[arg-type]

    a, b = _ids(tiny, (2, 9), seed=1), _ids(tiny, (2, 9), seed=2)
    want_a, want_b = tiny.logits_for_batch(a), tiny.logits_for_batch(b)
    monkeypatch.setattr(runtime, "hidden_states", counted)
    tiny.prefetch(a)
    assert len(calls) == 1
    got = torch.cat([p for _, p in tiny.logit_chunks(a, chunk_tokens=5, dtype="float32")])
    assert len(calls) == 1  # taken from the prefetch, not run again
    torch.testing.assert_close(got, want_a.reshape(-1, tiny.vocab_size()), rtol=1e-5, atol=1e-5)
    tiny.logits_for_batch(a)
    assert len(calls) == 2  # taken once only
    tiny.prefetch(a)
    torch.testing.assert_close(tiny.logits_for_batch(b), want_b, rtol=0, atol=0)  # other ids: run anew
    assert len(calls) == 4
    tiny.prefetch(a)
    tiny.logits_for_batch(b)  # any forward in between discards the prefetch
    tiny.logits_for_batch(a)
    assert len(calls) == 7


@pytest.mark.parametrize("chunked", [True, False])
def test_a_prefetched_forward_that_overflowed_is_rerun(tiny: DequantTeacher, chunked: bool) -> None:
    # the prefetch queues the overflow flag with the forward; the call that takes it must
    # still see it, fall back, and hand out only the bf16 rerun's logits
    big = {"blk.0.ffn_norm.weight": 1e6}
    ids = _ids(tiny, (2, 9), seed=6)
    guarded = _twin(tiny, torch.float16, big)
    guarded.runner.overflow_fallback = torch.bfloat16
    guarded.prefetch(ids)
    assert guarded.ops.dtype == torch.float16  # nothing read yet: the prefetch does not sync
    if chunked:
        got = torch.cat([c for _, c in guarded.logit_chunks(ids, chunk_tokens=4, dtype="float32")])
    else:
        got = guarded.logits_for_batch(ids).reshape(-1, tiny.vocab_size())
    assert torch.isfinite(got).all() and guarded.ops.dtype == torch.bfloat16
    torch.testing.assert_close(got, guarded.logits_for_batch(ids).reshape(got.shape))
