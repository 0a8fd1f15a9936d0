"""The KD step and the training loop, on a small fake LogitProvider (no GGUF needed)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from teacher.distill import (
    COMPLETION_FORMAT,
    DistillConfig,
    DistillResult,
    StepInBackward,
    distill,
    evaluate,
    kd_step_loss,
    load_token_ids,
    windows,
)
from teacher.kd import kd_loss
from teacher.provider import LogitProvider, VocabMismatchError, effective_vocab
from teacher.student import Student, StudentConfig, load_student

CFG = StudentConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_size=64, max_context=64, rope_theta=10_000.0)


class FakeTeacher:
    """A frozen bigram-like teacher: logits depend on the current token only."""

    def __init__(self, native: int = 112, target: int | None = None, seed: int = 7,
                 report: int | None = None) -> None:
        self.native = native
        self.vocab = effective_vocab(native, target)
        self.report = report  # a lying vocab_size(), for the defensive check
        self.table = torch.randn(native, native, generator=torch.Generator().manual_seed(seed)) * 2
        self.calls = 0

    def vocab_size(self) -> int:
        return self.report if self.report is not None else self.vocab

    def logits_for_batch(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        self.calls += 1
        ids = torch.as_tensor(input_ids)
        return self.table[ids][..., : self.vocab].clone()


def _data(n_windows: int = 24, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return windows(torch.randint(0, CFG.vocab_size, (n_windows * seq_len,), generator=g), seq_len)


def test_fake_is_a_provider() -> None:
    assert isinstance(FakeTeacher(), LogitProvider)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.0), (4.0, 0.3), (0.5, 1.0)])
def test_kd_step_loss_matches_float64_reference(temperature: float, alpha: float) -> None:
    teacher = FakeTeacher(target=CFG.vocab_size)
    student = Student(CFG, seed=2)
    ids = _data()[:3]
    out = kd_step_loss(teacher, student, ids, temperature=temperature, alpha=alpha)
    with torch.no_grad():
        s = student(ids).double()
    t = teacher.logits_for_batch(ids).double()
    p_t = torch.softmax(t / temperature, -1)
    kl = (p_t * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum(-1)
    kd_ref = temperature**2 * kl.mean()
    ce_ref = F.cross_entropy(s[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
    ref = (1 - alpha) * kd_ref + alpha * ce_ref
    assert out.kd == pytest.approx(float(kd_ref), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    out.loss.backward()  # the loss reaches the student's parameters
    assert student.embed.weight.grad is not None and torch.isfinite(student.embed.weight.grad).all()


def test_mismatch_stops_before_any_teacher_compute() -> None:
    teacher = FakeTeacher()  # native 112, no target: disagrees with the student's 96
    student = Student(CFG)
    with pytest.raises(VocabMismatchError, match=r"teacher vocab 112 != student vocab 96"):
        kd_step_loss(teacher, student, _data()[:2], temperature=2.0)
    assert teacher.calls == 0
    with pytest.raises(VocabMismatchError, match=r"112.*96"):
        distill(teacher, student, _data(), DistillConfig(seq_len=16, progress=False))
    assert teacher.calls == 0


def test_provider_that_misreports_its_vocab_is_caught() -> None:
    teacher = FakeTeacher(report=CFG.vocab_size)  # says 96, returns 112-wide logits
    with pytest.raises(VocabMismatchError, match=r"vocab 112 but the student vocab is 96"):
        kd_step_loss(teacher, Student(CFG), _data()[:2], temperature=2.0)


def _run(tmp: Path, **kw: object) -> tuple[Student, DistillResult]:
    student = Student(CFG, seed=11)
    cfg = DistillConfig(**{"epochs": 2, "batch_size": 5, "seq_len": 16, "lr": 3e-3, "progress": False,
                           "checkpoint_every": 2, **kw})  # type: ignore[arg-type]
    res = distill(FakeTeacher(target=CFG.vocab_size), student, _data(), cfg,
                  output_dir=tmp / "out", checkpoint_dir=tmp / "ckpt", resume=True)
    return student, res


def test_loss_falls_and_completion_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student, res = _run(tmp_path, epochs=4, lr=1e-2)
    out = capsys.readouterr().out.strip().splitlines()
    assert res.completed and res.steps == 4 * 5  # 24 windows / batch 5 -> 5 batches per epoch
    assert res.tokens == 4 * 24 * 16
    assert out[-1] == COMPLETION_FORMAT.format(initial=res.initial_loss, final=res.final_loss)
    assert out[-1].startswith("Distillation complete: initial_loss=")
    assert res.final_loss < 0.8 * res.initial_loss
    assert res.finite and res.tokens_per_s > 0 and res.peak_memory_bytes is None
    back = load_student(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), back.state_dict().values(), strict=True))


@pytest.mark.parametrize("stop_at", [3, 7])  # inside epoch 0, and inside epoch 1 after a boundary
def test_interrupted_run_resumes_to_the_same_state(tmp_path: Path, stop_at: int) -> None:
    ref_student, ref = _run(tmp_path / "ref")
    _, part = _run(tmp_path / "run", max_steps=stop_at)
    assert not part.completed and part.steps == stop_at
    state = json.loads((tmp_path / "run" / "ckpt" / "state.json").read_text())
    assert state["step"] == stop_at
    # a new process would rebuild the student from scratch: the checkpoint must carry everything
    resumed_student, resumed = _run(tmp_path / "run")
    assert resumed.resumed_from_step == stop_at
    assert resumed.losses == ref.losses
    for a, b in zip(ref_student.state_dict().values(), resumed_student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_checkpoints_and_resumes(tmp_path: Path) -> None:
    ref_student, ref = _run(tmp_path / "ref")

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    student = Student(CFG, seed=11)
    cfg = DistillConfig(epochs=2, batch_size=5, seq_len=16, lr=3e-3, progress=False, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        distill(FakeTeacher(target=CFG.vocab_size), student, _data(), cfg, checkpoint_dir=tmp_path / "c",
                on_step=interrupt)
    # the interrupted step's update happened before on_step: the checkpoint is after step 4
    assert json.loads((tmp_path / "c" / "state.json").read_text())["step"] == 4
    again = Student(CFG, seed=99)  # different init: resume must overwrite it
    res = distill(FakeTeacher(target=CFG.vocab_size), again, _data(), cfg, checkpoint_dir=tmp_path / "c",
                  resume=True)
    assert res.losses == ref.losses
    for a, b in zip(ref_student.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="checkpoint was made with"):
        _run(tmp_path, lr=1e-2)


def test_bad_inputs() -> None:
    teacher, student = FakeTeacher(target=CFG.vocab_size), Student(CFG)
    with pytest.raises(ValueError, match="temperature"):
        distill(teacher, student, _data(), DistillConfig(seq_len=16, temperature=0.0))
    with pytest.raises(ValueError, match="alpha"):
        distill(teacher, student, _data(), DistillConfig(seq_len=16, alpha=1.5))
    with pytest.raises(ValueError, match=r"seq_len=32"):
        distill(teacher, student, _data(), DistillConfig(seq_len=32))
    bad = _data().clone()
    bad[0, 0] = CFG.vocab_size
    with pytest.raises(ValueError, match="outside the student vocab"):
        distill(teacher, student, bad, DistillConfig(seq_len=16))
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(torch.arange(5), 16)


def test_load_token_ids(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1 2, 3\n4")
    (tmp_path / "b.json").write_text("[5, 6]")
    (tmp_path / "c.txt").write_text("1 two 3")
    assert load_token_ids(tmp_path / "a.txt").tolist() == [1, 2, 3, 4]
    assert load_token_ids(tmp_path / "b.json").tolist() == [5, 6]
    with pytest.raises(ValueError, match="not a file of integer token ids"):
        load_token_ids(tmp_path / "c.txt")


def test_evaluate_reports_ce_and_kd() -> None:
    teacher, student = FakeTeacher(target=CFG.vocab_size), Student(CFG)
    res = evaluate(student, _data()[:4], teacher=teacher, temperature=2.0)
    # an untrained student with small weights is close to uniform: CE ~ log(vocab)
    assert abs(res["ce"] - math.log(CFG.vocab_size)) < 0.5
    assert res["kd"] > 0


def test_bf16_autocast_path_keeps_f32_master_weights() -> None:
    """The CUDA mixed-precision path (bf16 autocast), exercised on CPU: F32 params and grads, close loss."""
    teacher, student = FakeTeacher(target=CFG.vocab_size), Student(CFG, seed=4)
    ids = _data()[:2]
    ref = kd_step_loss(teacher, student, ids, temperature=2.0, amp=False)
    out = kd_step_loss(teacher, student, ids, temperature=2.0, amp=True)
    assert out.loss.dtype == torch.float32
    assert out.kd == pytest.approx(ref.kd, rel=0.05)
    out.loss.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in student.parameters())


def test_resume_on_other_data_is_refused(tmp_path: Path) -> None:
    cfg = DistillConfig(batch_size=5, seq_len=16, progress=False, max_steps=2)
    distill(FakeTeacher(target=CFG.vocab_size), Student(CFG), _data(), cfg, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other data"):
        distill(FakeTeacher(target=CFG.vocab_size), Student(CFG), _data(seed=1), cfg, checkpoint_dir=tmp_path,
                resume=True)


def test_step_in_backward_is_the_same_adamw(tmp_path: Path) -> None:
    """AdamW per parameter inside backward ends where one AdamW after backward does (no clip in either)."""
    ref_student, ref = _run(tmp_path / "ref", grad_clip=None)
    student, res = _run(tmp_path / "sib", grad_clip=None, step_in_backward=True)
    assert res.completed and len(res.losses) == len(ref.losses)
    assert res.losses == pytest.approx(ref.losses, rel=1e-5)
    for (name, a), b in zip(ref_student.state_dict().items(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # every hook was removed: a later backward leaves its gradients alone
    out = kd_step_loss(FakeTeacher(target=CFG.vocab_size), student, _data()[:2], temperature=2.0)
    out.loss.backward()
    assert student.embed.weight.grad is not None


@pytest.mark.parametrize("batch_size", [5, 1])  # 1 x 16 rows < hidden 32: the tied weight is stepped by rows
def test_step_in_backward_resumes(tmp_path: Path, batch_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher.kd_chunked as K

    monkeypatch.setattr(K, "W_BLOCK_ROWS", 40)  # the tied weight's AdamW in three blocks of rows
    ref_student, ref = _run(tmp_path / "ref", grad_clip=None, step_in_backward=True, batch_size=batch_size)
    _run(tmp_path / "run", grad_clip=None, step_in_backward=True, max_steps=4, batch_size=batch_size)
    student, res = _run(tmp_path / "run", grad_clip=None, step_in_backward=True, batch_size=batch_size)
    assert res.resumed_from_step == 4 and res.losses == ref.losses
    for a, b in zip(ref_student.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="checkpoint was made with"):  # the optimizer state differs in kind
        _run(tmp_path / "run", grad_clip=None, batch_size=batch_size)


def test_step_in_backward_refuses_a_global_clip() -> None:
    with pytest.raises(ValueError, match=r"grad_clip=1.0"):
        DistillConfig(step_in_backward=True).validate()


def test_steady_state_numbers(tmp_path: Path) -> None:
    _, res = _run(tmp_path, epochs=1, warmup_steps=2)
    assert res.steps == 5 and res.steady_steps == 3 and res.steady_tokens_per_s is not None
    assert res.step_ms is not None and set(res.step_ms) == {"teacher", "student_fwd_bwd", "optimizer", "total"}
    assert res.step_ms["teacher"] > 0 and res.step_ms["optimizer"] > 0
    assert res.step_ms["total"] >= res.step_ms["teacher"] + res.step_ms["optimizer"]
    assert "steady state over 3 steps after 2 warm-up" in res.summary()
    _, short = _run(tmp_path / "short", epochs=1, warmup_steps=9)
    assert short.steady_tokens_per_s is None and "no steady-state numbers" in short.summary()


def test_checkpointed_layers_give_the_same_gradients(tmp_path: Path) -> None:
    teacher, ids = FakeTeacher(target=CFG.vocab_size), _data()[:3]
    grads = []
    for recompute in (False, True):
        student = Student(CFG, seed=5)
        student.checkpoint_layers = recompute
        kd_step_loss(teacher, student, ids, temperature=2.0, alpha=0.3).loss.backward()
        grads.append([p.grad for p in student.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    _, res = _run(tmp_path, epochs=1, checkpoint_activations=True)
    assert res.completed and res.finite


def test_checkpointed_layers_save_less_for_backward() -> None:
    def saved_bytes(recompute: bool) -> int:
        student = Student(CFG, seed=5)
        student.checkpoint_layers = recompute
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            student(_data()[:4], hidden_only=True)
        return total

    full, recomputed = saved_bytes(False), saved_bytes(True)
    assert recomputed < full / 3, (recomputed, full)


def test_tied_weight_gradient_is_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup adds its rows into the fused loss's lm_head gradient: same values as autograd's sum,
    and the parameter's .grad is that very buffer (no second dense [vocab, hidden] gradient)."""
    import teacher.kd_chunked as K

    returned: list[int] = []  # addresses only: a reference held here would make autograd copy the tensor
    original = K._FusedKD.forward

    def spy(ctx: Any, *args: Any) -> torch.Tensor:
        out = original(ctx, *args)
        returned.append(ctx.grads[1].data_ptr())
        return out

    monkeypatch.setattr(K._FusedKD, "forward", staticmethod(spy))
    from torch.utils._python_dispatch import TorchDispatchMode

    class NewVH(TorchDispatchMode):
        """The ops that produce a [vocab, hidden] tensor."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (CFG.vocab_size, CFG.hidden_size):
                self.ops.append(str(func))
            return out

    teacher, ids = FakeTeacher(target=CFG.vocab_size), _data()[:3]
    student = Student(CFG, seed=6)
    out = kd_step_loss(teacher, student, ids, temperature=2.0)
    with NewVH() as seen:
        out.loss.backward()
    # in place or views only: no second dense gradient (embedding_dense_backward, an out-of-place add)
    assert all(op.split(".")[1].endswith("_") or op == "aten.detach.default" for op in seen.ops), seen.ops
    grad = student.embed.weight.grad
    assert grad is not None and grad.data_ptr() == returned[0]
    # the reference: the full logits through the tied nn.Linear, autograd summing the two uses
    ref = Student(CFG, seed=6)
    t = teacher.logits_for_batch(ids)
    kd_loss(t, ref(ids), 2.0).backward()
    assert ref.embed.weight.grad is not None
    torch.testing.assert_close(grad, ref.embed.weight.grad, rtol=1e-5, atol=1e-7)


class PrefetchingTeacher(FakeTeacher):
    """Records each prefetch and whether the next logits call asked for exactly those ids."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.pending: torch.Tensor | None = None
        self.prefetched = 0
        self.hits = 0

    def prefetch(self, input_ids: torch.Tensor) -> None:
        assert self.pending is None, "a prefetch nobody asked for"
        self.pending = torch.as_tensor(input_ids).clone()
        self.prefetched += 1

    def logits_for_batch(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        if self.pending is not None:
            assert torch.equal(torch.as_tensor(input_ids), self.pending), "prefetched other ids"
            self.hits += 1
            self.pending = None
        return super().logits_for_batch(input_ids)


def test_next_batch_is_prefetched_and_training_is_unchanged(tmp_path: Path) -> None:
    cfg = DistillConfig(epochs=2, batch_size=5, seq_len=16, lr=3e-3, progress=False, max_steps=8)
    plain, fetching = Student(CFG, seed=11), Student(CFG, seed=11)
    ref = distill(FakeTeacher(target=CFG.vocab_size), plain, _data(), cfg)
    teacher = PrefetchingTeacher(target=CFG.vocab_size)
    res = distill(teacher, fetching, _data(), cfg)
    # 5 batches per epoch: epoch 0 prefetches for steps 2..5, epoch 1 for 7..8 (max_steps stops it)
    assert res.steps == 8 and teacher.prefetched == 4 + 2 and teacher.hits == teacher.prefetched
    assert teacher.pending is None
    assert res.losses == ref.losses
    for a, b in zip(plain.state_dict().values(), fetching.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_step_in_backward_by_rows_is_the_same_adamw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With few rows per step (here 16 < hidden 32) the tied lm_head's gradient is kept as its
    factors and AdamW steps the weight a block of rows at a time: training still ends where one
    AdamW after backward ends."""
    import teacher.kd_chunked as K

    monkeypatch.setattr(K, "W_BLOCK_ROWS", 40)  # vocab 96: blocks of 40, 40 and 16 rows
    built = []
    rows = K.DeferredHeadGrad.rows

    def counted(self: K.DeferredHeadGrad) -> Iterator[tuple[int, torch.Tensor]]:
        for v0, d in rows(self):
            built.append(v0)
            yield v0, d

    monkeypatch.setattr(K.DeferredHeadGrad, "rows", counted)
    ref_student, ref = _run(tmp_path / "ref", grad_clip=None, batch_size=1, epochs=1)
    assert not built  # one AdamW after backward: the gradient is whole
    student, res = _run(tmp_path / "rows", grad_clip=None, batch_size=1, epochs=1, step_in_backward=True)
    assert built == [0, 40, 80] * res.steps
    assert res.losses == pytest.approx(ref.losses, rel=1e-5)
    for (name, a), b in zip(ref_student.state_dict().items(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_row_step_refuses_rows_that_are_not_a_block() -> None:
    student = Student(CFG, seed=1)
    opt = StepInBackward(list(student.parameters()), lambda ps: torch.optim.AdamW(ps), by_rows=[student.embed.weight],
                         block_rows=40)
    step = opt.row_step(student.embed.weight)
    with pytest.raises(ValueError, match="not a block"):
        step(8, torch.zeros(40, CFG.hidden_size))
    with pytest.raises(ValueError, match="not a block"):
        step(80, torch.zeros(40, CFG.hidden_size))  # the last block has 16 rows
    before = student.embed.weight.detach().clone()
    step(80, torch.ones(16, CFG.hidden_size))
    moved = (student.embed.weight.detach() != before).any(dim=1)
    assert moved[80:].all() and not moved[:80].any()
    opt.remove()
