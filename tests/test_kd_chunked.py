"""The chunked, lm_head-fused KD loss against autograd through the full-logits definition."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from teacher.kd import kd_loss
from teacher.kd_chunked import IGNORE, ChunkStats, fused_kd_loss, next_token_targets, teacher_chunks
from teacher.provider import VocabMismatchError

N, H, V = 37, 12, 50  # 37 rows: no chunk size below divides it, so the last chunk is short


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (1, N), generator=g)
    return hidden, weight, teacher, next_token_targets(ids)


def _source(t: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    return ((r0, t[r0 : r0 + chunk]) for r0 in range(0, t.shape[0], chunk))


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.0), (3.0, 0.4), (0.7, 1.0)])
def test_loss_and_gradients_match_autograd(chunk: int, temperature: float, alpha: float) -> None:
    hidden, weight, teacher, targets = _inputs()
    # reference: full logits, the repository's kd_loss, autograd
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = h_ref @ w_ref.T
    ref = (1 - alpha) * kd_loss(teacher, z, temperature).double()
    if alpha > 0:
        ref = ref + alpha * torch.nn.functional.cross_entropy(z, targets, ignore_index=IGNORE)
    ref.backward()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    stats = ChunkStats()
    got = fused_kd_loss(h, w, lambda: _source(teacher, chunk), temperature=temperature, alpha=alpha,
                        targets=targets if alpha > 0 else None, compute_dtype=torch.float64, stats=stats)
    (got * 3).backward()  # a non-unit upstream gradient must scale both stored gradients
    assert stats.chunks == -(-N // chunk) and stats.rows == N
    # the loss terms are accumulated in float32 whatever the inputs: that precision, no better
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert h.grad is not None and w.grad is not None and h_ref.grad is not None and w_ref.grad is not None
    torch.testing.assert_close(h.grad, 3 * h_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, 3 * w_ref.grad.float(), rtol=1e-5, atol=1e-7, check_dtype=False)


def test_bf16_compute_stays_close(monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher.kd_chunked as K

    monkeypatch.setattr(K, "W_BLOCK_ROWS", 16)  # the bf16 GEMMs run per vocab block: 4 of them
    hidden, weight, teacher, _ = _inputs(1)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        loss = fused_kd_loss(h, w, lambda dtype=dtype: _source(teacher.to(dtype), 16), temperature=2.0,  # type: ignore[misc]
                             compute_dtype=dtype)
        loss.backward()
        out.append((float(loss.detach()), h.grad, w.grad))
    (exact, gh, gw), (bf16, bh, bw) = out
    assert bf16 == pytest.approx(exact, rel=0.05)
    for a, b in ((gh, bh), (gw, bw)):
        assert a is not None and b is not None
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99


def test_bad_chunks_are_named() -> None:
    hidden, weight, teacher, _ = _inputs()
    with pytest.raises(VocabMismatchError, match=r"vocab 49 but the student vocab is 50"):
        fused_kd_loss(hidden, weight, lambda: _source(teacher[:, :49], 8), temperature=1.0)
    with pytest.raises(ValueError, match=r"covered 32 of the batch's 37"):
        fused_kd_loss(hidden, weight, lambda: _source(teacher[:32], 8), temperature=1.0)
    skip = lambda: iter([(0, teacher[:8]), (16, teacher[16:24])])  # noqa: E731
    with pytest.raises(ValueError, match=r"do not continue at row 8"):
        fused_kd_loss(hidden, weight, skip, temperature=1.0)
    with pytest.raises(ValueError, match="alpha > 0 needs targets"):
        fused_kd_loss(hidden, weight, lambda: _source(teacher, 8), temperature=1.0, alpha=0.5)


class _Chunked:
    """A teacher with the chunked API; logits_for_batch must not be called."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.asked: list[tuple[int, torch.dtype]] = []

    def vocab_size(self) -> int:
        return int(self.table.shape[1])

    def logits_for_batch(self, ids: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the full-batch logits were asked for")

    def logit_chunks(self, ids: torch.Tensor, chunk_tokens: int = 2048,
                     dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[int, torch.Tensor]]:
        self.asked.append((chunk_tokens, dtype))
        flat = self.table[ids.reshape(-1)].to(dtype)
        return ((r0, flat[r0 : r0 + chunk_tokens]) for r0 in range(0, flat.shape[0], chunk_tokens))


def test_teacher_chunks_prefers_the_chunked_api() -> None:
    t = _Chunked(torch.randn(20, 20))
    ids = torch.randint(0, 20, (3, 5))
    got = list(teacher_chunks(t, ids, 4, torch.float32))
    assert t.asked == [(4, torch.float32)]
    assert [r0 for r0, _ in got] == [0, 4, 8, 12]
    torch.testing.assert_close(torch.cat([c for _, c in got]), t.table[ids.reshape(-1)])


def test_lm_head_cast_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """W is cast to the compute dtype 16 rows at a time (the last block short): same loss and gradients."""
    import teacher.kd_chunked as K

    hidden, weight, teacher, targets = _inputs(2)

    def run() -> tuple[float, torch.Tensor, torch.Tensor]:
        h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        loss = fused_kd_loss(h, w, lambda: _source(teacher, 16), temperature=2.0, alpha=0.5, targets=targets,
                             compute_dtype=torch.float64)  # != W's float32: the cast path
        loss.backward()
        assert h.grad is not None and w.grad is not None
        return float(loss.detach()), h.grad, w.grad

    whole = run()
    monkeypatch.setattr(K, "W_BLOCK_ROWS", 16)  # V = 50: blocks of 16, 16, 16, 2
    blocks = run()
    assert blocks[0] == pytest.approx(whole[0], rel=1e-6)
    torch.testing.assert_close(blocks[1], whole[1])
    torch.testing.assert_close(blocks[2], whole[2])


@pytest.mark.parametrize("compute", [torch.float64, torch.bfloat16])
def test_deferred_head_gradient_is_the_accumulated_one(compute: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """dW kept as its factors (G by vocab block, and X) and built afterwards is the dW the chunk
    loop accumulates; dX does not change at all."""
    import teacher.kd_chunked as K

    monkeypatch.setattr(K, "W_BLOCK_ROWS", 16)  # V = 50: blocks of 16, 16, 16 and 2 rows
    hidden, weight, teacher, targets = _inputs(2)
    grads = {}
    for defer in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_kd_loss(h, w, lambda: _source(teacher, 8), temperature=2.0, alpha=0.3, targets=targets,
                             compute_dtype=compute, defer_weight_grad=defer)
        (loss * 3).backward()
        grads[defer] = (h.grad, w.grad)
    assert grads[True][0] is not None and grads[True][1] is not None and grads[False][1] is not None
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=0)
    # float: the same products summed in another order; bf16: one rounding of G^T X instead of one per chunk
    tol = {"rtol": 1e-6, "atol": 1e-8} if compute == torch.float64 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(grads[True][1], grads[False][1], **tol)


def test_deferred_head_gradient_goes_to_the_sink_by_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher.kd_chunked as K
    from teacher.student import GradSink

    monkeypatch.setattr(K, "W_BLOCK_ROWS", 16)
    hidden, weight, teacher, _ = _inputs(3)
    w_ref = weight.clone().requires_grad_()
    fused_kd_loss(hidden, w_ref, lambda: _source(teacher, 8), temperature=1.5, compute_dtype=torch.float64).backward()
    w = weight.clone().requires_grad_()
    sink = GradSink()
    (fused_kd_loss(hidden, w, lambda: _source(teacher, 8), temperature=1.5, compute_dtype=torch.float64,
                   weight_sink=sink, defer_weight_grad=True) * 2).backward()
    assert w.grad is None and len(sink) == 1 and isinstance(sink[0], K.DeferredHeadGrad)
    blocks = list(sink[0].rows())
    assert [(v0, d.shape[0]) for v0, d in blocks] == [(0, 16), (16, 16), (32, 16), (48, 2)]
    assert w_ref.grad is not None
    torch.testing.assert_close(torch.cat([d for _, d in blocks]), 2 * w_ref.grad.float(), rtol=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="already consumed"):
        next(sink[0].rows())


def test_defer_saves_memory_compares_the_two_footprints() -> None:
    from teacher.kd_chunked import defer_saves_memory

    # the 0.5B student (H = 896): 2 x 256 rows of bf16 G are 0.29x its float32 dW; 8 x 512 are 2.3x
    assert defer_saves_memory(512, 896, torch.bfloat16)
    assert not defer_saves_memory(4096, 896, torch.bfloat16)
    assert defer_saves_memory(895, 896, torch.float32) and not defer_saves_memory(896, 896, torch.float32)
