"""The Q4K teacher's runtime on a GPU: graphs replay what the eager forward computes,
every kernel path agrees with the F32 reference, the chunked head tiles the logits,
and the forward makes no host sync (CUDA only; NOT RUN elsewhere)."""

from __future__ import annotations

import collections
import itertools
from typing import Any

import pytest
import torch

from teacher.models import resolve_model

# (batch, seq): B*T rows per linear, chosen so that every dispatch path runs ("dequant": past
# the wgmma GEMM's range too, so that an sm_90 GPU decodes + cuBLAS as well)
SHAPES = {"gemv1": (1, 1), "gemv": (1, 5), "gemv_tc": (2, 10), "mma": (1, 60), "dequant": (2, 150)}


@pytest.fixture(scope="module")
def tiny() -> Any:
    from teacher.q4k_teacher import Q4KTeacher

    return Q4KTeacher.from_gguf(resolve_model("tiny"))


@pytest.fixture(scope="module")
def reference() -> Any:
    from teacher.dequant_teacher import DequantTeacher

    return DequantTeacher.from_gguf(resolve_model("tiny"), device="cuda")


def _ids(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("label", list(SHAPES))
def test_every_path_matches_the_f32_reference(tiny: Any, reference: Any, label: str) -> None:
    from cupy_kernels import launch

    shape = SHAPES[label]
    m = shape[0] * shape[1]
    w = tiny.device_weights()["blk.0.ffn_down.weight"]
    path = launch.dispatch_path(m, w.qtype, w.n, w.k, x_is_bf16=True)
    assert path.startswith(label) or label.startswith(path), (label, path)
    ids = _ids(tiny.vocab_size(), shape)
    got = tiny.logits_for_batch(ids).double()
    ref = reference.logits_for_batch(ids).double()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert float(cos.min()) >= 0.999, f"{label}: min cosine {float(cos.min())}"


def test_graph_replays_the_eager_forward(tiny: Any) -> None:
    ids = _ids(tiny.vocab_size(), (2, 37), seed=4)
    runner = tiny.runner
    assert runner.graphs, "graphs are on by default on CUDA"
    eager = tiny.logits_for_batch(ids)  # a shape's first forward runs eagerly, nothing captured
    assert (2, 37) not in runner._captured
    graphed = [tiny.logits_for_batch(ids) for _ in range(2)]  # capture, then replay
    assert (2, 37) in runner._captured
    torch.testing.assert_close(graphed[1], graphed[0], rtol=0, atol=0)
    torch.testing.assert_close(graphed[1], eager, rtol=1e-3, atol=1e-3)
    # a different batch of the same shape goes through the same graph with new ids
    other = tiny.logits_for_batch(_ids(tiny.vocab_size(), (2, 37), seed=5))
    assert not torch.equal(other, graphed[1])


def test_chunks_and_bf16_logits(tiny: Any) -> None:
    ids = _ids(tiny.vocab_size(), (2, 50), seed=6)
    full = tiny.logits_for_batch(ids).reshape(-1, tiny.vocab_size())
    parts = [(r0, p) for r0, p in tiny.logit_chunks(ids, chunk_tokens=33, dtype="float32")]
    assert [r0 for r0, _ in parts] == [0, 33, 66, 99]
    # the last chunk is one token: the M = 1 GEMV (exact weights) instead of the bf16
    # decode + GEMM, so rounding differs at the bf16 level; a misplaced chunk would not
    torch.testing.assert_close(torch.cat([p for _, p in parts]), full, rtol=2e-2, atol=2e-2)
    bf = tiny.logits_for_batch(ids, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float().reshape(-1, tiny.vocab_size()), full, rtol=2e-2, atol=2e-2)


def test_forward_makes_no_host_sync(tiny: Any) -> None:
    # torch raises on any synchronising call while the debug mode is "error"; the
    # eager forward (graphs off) exercises every op the graph captures
    ids = _ids(tiny.vocab_size(), (1, 200), seed=7).cuda()
    tiny.runner.graphs = False
    try:
        tiny.runner.run_hidden(ids)  # warm: kernels compile and load outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            # the forward itself; hidden() adds the one f16-overflow check after it
            tiny.runner.run_hidden(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        tiny.runner.graphs = True


def test_f16_by_default_and_bf16_after_an_overflow(tiny: Any, caplog: pytest.LogCaptureFixture) -> None:
    from teacher.q4k_teacher import Q4KTeacher

    assert tiny.activation_dtype == torch.float16
    t = Q4KTeacher.from_gguf(resolve_model("tiny"))
    # a norm weight that puts the FFN input past f16's range: f32 norms, f16 matmul input
    t.ops.vectors["blk.0.ffn_norm.weight"] = t.ops.vectors["blk.0.ffn_norm.weight"] * 1e6
    ids = _ids(t.vocab_size(), (1, 70), seed=8)  # M = 70: decode + cuBLAS, or the wgmma GEMM on sm_90
    with caplog.at_level("WARNING", logger="teacher.runtime"):
        out = t.logits_for_batch(ids)
    assert "float16 activations overflowed" in caplog.text
    assert t.activation_dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    t.runner.overflow_fallback = None  # the control: f16 without the fallback is not finite
    t.ops.set_activation_dtype(torch.float16)
    t.runner.drop_graphs()
    assert not bool(torch.isfinite(t.logits_for_batch(ids)).all())



def test_the_overflow_flag_is_read_without_waiting_for_later_work(tiny: Any) -> None:
    # the reader waits for the flag's copy behind the forward, not for the head or
    # anything else queued after it: ~1 s of spinning queued behind it is still running
    # when it returns, while the control (reading the device flag) waits for it
    runner = tiny.runner
    h = runner.run_hidden(_ids(tiny.vocab_size(), (1, 40), seed=12).cuda())
    read = runner._flag_reader(h)
    assert read is not None
    torch.cuda._sleep(2_000_000_000)
    stream = torch.cuda.current_stream()
    assert read() is False and not stream.query()
    flag = runner._overflowed(h)
    assert flag is not None
    torch.cuda._sleep(2_000_000_000)
    assert bool(flag) is False and stream.query()


@pytest.mark.parametrize("head_bf16", [True, False])
def test_the_head_multiplies_in_bf16_under_f16_activations(tiny: Any, reference: Any, head_bf16: bool) -> None:
    from teacher.forward import HEAD_NAMES

    ops = tiny.ops
    assert ops.dtype == torch.float16 and ops.head_bf16, "the defaults"
    seen: list[tuple[str, torch.dtype]] = []
    decoded = ops._decoded_chunks

    def spy(w: Any, dtype: torch.dtype) -> Any:
        seen.append((w.name, dtype))
        return decoded(w, dtype)

    ids = _ids(tiny.vocab_size(), (2, 143), seed=13)  # M = 286: decode + cuBLAS (past the wgmma GEMM's range)
    ops.head_bf16, ops._decoded_chunks = head_bf16, spy
    try:
        got = tiny.logits_for_batch(ids).double()  # eager or captured: the layers run either way
    finally:
        ops.head_bf16 = True
        del ops._decoded_chunks
    head = {d for n, d in seen if n in HEAD_NAMES}
    layers = {d for n, d in seen if n not in HEAD_NAMES}
    assert head == {torch.bfloat16 if head_bf16 else torch.float16} and layers == {torch.float16}
    cos = torch.nn.functional.cosine_similarity(got, reference.logits_for_batch(ids).double(), dim=-1)
    assert float(cos.min()) >= 0.999

def test_one_decode_scratch_for_graph_and_head(tiny: Any) -> None:
    # M = 300 rows: every linear and the lm_head take the decode + cuBLAS path (past the
    # wgmma GEMM's range on sm_90), in the graph and eagerly; they share one scratch (two
    # would both count in the peak)
    from teacher.forward import HEAD_NAMES

    ops = tiny.ops
    ids = _ids(tiny.vocab_size(), (2, 150), seed=9)
    before = collections.Counter(ops.taken)
    decoded, seen = ops._decoded_chunks, set()

    def spy(w: Any, dtype: torch.dtype) -> Any:
        seen.add(w.name)
        return decoded(w, dtype)

    ops._decoded_chunks = spy
    try:
        for _ in range(3):  # eager, capture, replay
            tiny.logits_for_batch(ids)
    finally:
        del ops._decoded_chunks
    paths = set(collections.Counter(ops.taken) - before)
    assert paths == {"dequant"}, f"paths taken at M = 300: {sorted(paths)}"
    assert seen & set(HEAD_NAMES) and len(seen) > 1, f"decoded: {sorted(seen)}"
    assert len(ops._scratches) == 1


def test_the_weights_share_one_device_allocation(tiny: Any) -> None:
    # a cudaMalloc per tensor is mapped in 2 MiB pages: 0.19 GiB unused on the 7B shape
    from teacher.q4k_teacher import ARENA_ALIGN

    bufs = [w.data for w in tiny.device_weights().values()]
    assert len(bufs) > 1 and len({id(b.data.mem) for b in bufs}) == 1
    assert all(b.data.ptr % ARENA_ALIGN == 0 for b in bufs)
    spans = sorted((b.data.ptr, b.data.ptr + b.nbytes) for b in bufs)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_x_writes_float32_logits_without_a_temporary(dtype: torch.dtype) -> None:
    # the lm_head's GEMM rounds its float32 sums straight into the float32 logits: the
    # error is float32's, not that of a product rounded to x's dtype first (~4e-3 in bf16)
    from teacher.forward import matmul_into

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(64, 512, device="cuda", generator=g).to(dtype)
    w = torch.randn(1000, 512, device="cuda", generator=g).to(dtype)
    out = torch.full((64, 1100), float("nan"), device="cuda")
    chunks = [(0, w[:600]), (600, w[600:])]
    # once first: cuBLAS takes its 32 MiB workspace from torch's allocator at the first GEMM
    # on a stream, and whether this worker ran one before depends on how xdist shares out the
    # tests (session 14: 34,925,568 against 1,371,136 bytes, the difference exactly 32 MiB)
    matmul_into(x, chunks, out)
    out.fill_(float("nan"))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    matmul_into(x, chunks, out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before  # no [M, rows] temporary
    ref = x.double() @ w.double().T
    rel = ((out[:, :1000].double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert rel < 1e-4, rel
    assert torch.isnan(out[:, 1000:]).all()  # nothing written past the chunks


def test_prefetch_is_taken_once_and_only_for_its_ids(tiny: Any) -> None:
    a, b = _ids(tiny.vocab_size(), (2, 24), seed=10), _ids(tiny.vocab_size(), (2, 24), seed=11)
    want_a, want_b = tiny.logits_for_batch(a), tiny.logits_for_batch(b)
    tiny.logits_for_batch(a)  # the shape is captured: prefetch replays the graph
    tiny.prefetch(a)
    torch.testing.assert_close(tiny.logits_for_batch(a), want_a, rtol=1e-3, atol=1e-3)
    assert tiny.runner._ahead is None  # taken
    tiny.prefetch(a)  # ids that do not match: b's logits, not a's
    torch.testing.assert_close(tiny.logits_for_batch(b), want_b, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(want_a, want_b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_norm_is_one_fused_kernel_that_agrees_with_the_textbook_form(dtype: torch.dtype) -> None:
    from torch.profiler import ProfilerActivity, profile

    from teacher.forward import rms_norm

    gen = torch.Generator().manual_seed(7)
    # a residual stream of a 7B layer at 512 tokens: float32, rows of very different scales
    x = (torch.randn(512, 3584, generator=gen) * torch.logspace(-3, 3, 512)[:, None]).cuda()
    w = (1 + 0.1 * torch.randn(3584, generator=gen)).cuda()
    textbook = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(dtype)
    got = rms_norm(x, w, 1e-6, dtype)
    assert got.dtype == dtype
    # float32: the sum of squares in another order, a few ulps; f16 / bf16: one rounding step
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}[dtype]
    torch.testing.assert_close(got, textbook, rtol=tol[0], atol=tol[1])
    rms_norm(x, w, 1e-6, dtype)  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rms_norm(x, w, 1e-6, dtype)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    # the fused norm, plus the cast where the result is not float32
    assert len(kernels) == (1 if dtype == torch.float32 else 2), kernels
