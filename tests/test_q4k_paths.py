"""FT-003's kernel-path items, host side (no CUDA): which M runs which path, the dispatch tap,
and a wrong decode confined to one path (the dequant path included).

Q4KOps runs here over a stand-in for the CuPy launch module: the real
``dispatch_path`` decides the path, the stand-in multiplies with torch on the CPU
what the real kernels would decode from the bytes (here: dense weights).
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from cupy_kernels import launch
from falsifiers.q4k_teacher import MAX_M, linear_shapes, m_for_path, q4k_teacher_corrupt_path
from harness.context import Context
from harness.contract import load_contract
from teacher.models import ModelUnavailable, resolve_model
from teacher.q4k_teacher import DeviceWeight, Q4KOps

ROOT = Path(__file__).resolve().parents[1]


def _shapes(name: str) -> list[tuple[Any, int, int]]:
    try:
        return linear_shapes(resolve_model(name))
    except ModelUnavailable as exc:
        pytest.skip(str(exc))


# -- which M runs which path ------------------------------------------------------------------
def test_every_path_is_reached_on_tiny_at_an_m_in_its_range() -> None:
    shapes = _shapes("tiny")
    ranges = {
        "gemv1_tc": range(1, 2),
        "gemv": range(1, launch.GEMV_MAX_M + 1),
        "gemv_tc": range(2, launch.GEMV_TC_MAX_M + 1),
        "mma": range(2, launch.DEQUANT_MIN_M),
        "wgmma": range(min(launch.WGMMA_MIN_M.values()), max(launch.WGMMA_MAX_M.values()) + 1),
        "dequant": range(launch.DEQUANT_MIN_M, 10**6),
    }
    assert set(ranges) == set(launch.PATHS), "a new kernel path needs a range here and an FT-003 case"
    for path, allowed in ranges.items():
        # the wgmma GEMM is reached only with f16 x on an sm_90 GPU
        flags = {"x_is_f16": True, "hopper": True} if path == "wgmma" else {}
        m, count = m_for_path(path, shapes, **flags)
        assert count >= 1 and m in allowed, (path, m, count)
        on_path = [s for s in shapes if launch.dispatch_path(m, *s, x_is_bf16=True, **flags) == path]
        assert len(on_path) == count
    assert m_for_path("wgmma", shapes) == (0, 0), "bf16 x, or no sm_90 GPU: never the wgmma GEMM"


def test_on_sm90_the_dequant_item_sends_every_linear_through_decode_and_cublas() -> None:
    # with f16 x on an sm_90 GPU, Q4_K/Q6_K linears take the wgmma GEMM up to WGMMA_MAX_M: the
    # dequant item must look past it, or the path the 512-token shapes run goes unchecked
    shapes = _shapes("tiny")
    m, count = m_for_path("dequant", shapes, x_is_f16=True, hopper=True)
    assert count == len(shapes) and m == max(launch.WGMMA_MAX_M.values()) + 1, (m, count, len(shapes))


def test_on_sm90_the_dequant_item_looks_past_the_wgmma_wide_range(monkeypatch: pytest.MonkeyPatch) -> None:
    # large Q4_K weights stay on the wgmma GEMM over WGMMA_WIDE's range: where it starts right
    # after WGMMA_MAX_M the 7B's dequant item must run past its last M, within the M searched
    q4, first, hi = int(QT.Q4_K), launch.WGMMA_MAX_M[int(QT.Q4_K)] + 1, 512
    shapes = [(QT.Q4_K, 18944, 3584), (QT.Q6_K, 3584, 18944), (QT.Q4_K, 512, 3584)]
    for lo, want in ((first, hi + 1), (first + 40, first)):
        monkeypatch.setattr(launch, "WGMMA_WIDE", {q4: (lo, hi, 1 << 26)})
        assert m_for_path("dequant", shapes, x_is_f16=True, hopper=True) == (want, 3), lo
        assert m_for_path("wgmma", shapes, x_is_f16=True, hopper=True)[1] == 3
    monkeypatch.undo()
    assert all(hi < MAX_M for _, hi, _ in launch.WGMMA_WIDE.values())


def test_on_sm90_the_wgmma_gemm_takes_the_whole_mma_range_of_q4k_and_q6k() -> None:
    # so FT-003's mma item is NOT RUN (not applicable) there for a file of only these two
    # formats; the mma GEMM remains the path of the others (Q5_0, Q8_0, ...) and off sm_90
    tiny = _shapes("tiny")
    assert {q for q, _, _ in tiny} == {QT.Q4_K, QT.Q6_K}
    assert m_for_path("mma", tiny, x_is_f16=True, hopper=True) == (0, 0)
    assert m_for_path("mma", tiny, x_is_f16=True)[1] == len(tiny)
    mid = launch.GEMV_TC_MAX_M + 1
    assert launch.dispatch_path(mid, QT.Q5_K, 1024, 1024, x_is_bf16=True, x_is_f16=True, hopper=True) == "mma"


def test_tensor_core_paths_are_unreachable_on_a_q4_1_file() -> None:
    shapes = _shapes("smollm2-135m")
    assert {q for q, _, _ in shapes} <= {QT.Q4_1, QT.Q8_0}
    assert m_for_path("gemv1_tc", shapes) == (0, 0) and m_for_path("gemv_tc", shapes) == (0, 0)
    assert m_for_path("gemv", shapes)[1] and m_for_path("mma", shapes)[1] and m_for_path("dequant", shapes)[1]


def test_unknown_path_is_an_error() -> None:
    with pytest.raises(ValueError, match="not one of"):
        m_for_path("gemm", [(QT.Q4_K, 256, 256)])


def test_ft003_has_one_item_per_path_and_a_path_confined_control() -> None:
    contract = load_contract(ROOT / "contracts" / "cuda-q4k-frozen-teacher-v1.yaml")
    tests = {t.id: t for t in contract.tests}
    ft3, ft6 = tests["FT-Q4K-TEACHER-003"].check, tests["FT-Q4K-TEACHER-006"].check
    assert ft3 is not None and ft6 is not None
    assert set(ft3.cases) == set(launch.PATHS)
    assert "q4k-teacher-corrupt-path" in ft3.controls and "q4k-teacher-corrupt-path" in ft6.controls
    # FT-006's Q4_1 model reaches exactly its cases
    shapes = _shapes("smollm2-135m")
    assert {p for p in launch.PATHS if m_for_path(p, shapes)[1]} == set(ft6.cases)


# -- the tap and the confined corruption, through Q4KOps.linear ---------------------------------
def _fake_launch() -> types.SimpleNamespace:
    def qmatmul(x: torch.Tensor, data: torch.Tensor, qtype: Any, n: int, k: int, *, out: torch.Tensor,
                path: str) -> torch.Tensor:
        assert path != "dequant", "the dequant path decodes with qdequant, never qmatmul"
        return out.copy_(x.float() @ data.T.float())

    def qdequant(data: torch.Tensor, qtype: Any, n: int, k: int, *, row0: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(data[row0 : row0 + out.shape[0]])

    return types.SimpleNamespace(
        PATHS=launch.PATHS, dispatch_path=launch.dispatch_path, dequant_chunk_rows=launch.dequant_chunk_rows,
        qmatmul=qmatmul, qdequant=qdequant, wgmma_writes_f16=launch.wgmma_writes_f16,
    )


def _ops(weights: dict[str, DeviceWeight]) -> Q4KOps:
    ops = object.__new__(Q4KOps)  # __init__ needs CuPy; set what linear() reads
    ops._launch = _fake_launch()  # type: ignore[assignment]
    ops.weights, ops.vectors = weights, {}
    ops.device, ops.dtype = torch.device("cpu"), torch.bfloat16
    ops.hopper, ops.sms = False, 132
    ops.taken, ops.path_overrides = Counter(), {}
    ops.scratch_bytes = launch.DEQUANT_SCRATCH_BYTES
    ops._scratches = []
    ops._wg_workspace = object()  # stands for the CuPy view Q4KOps makes on an sm_90 GPU
    ops.head_bf16 = True
    ops._torch_stream = contextlib.nullcontext  # type: ignore[method-assign]
    return ops


M_OF_PATH = {"gemv1_tc": 1, "gemv_tc": 4, "mma": 40, "dequant": 70}


@pytest.mark.parametrize("corrupt", sorted(M_OF_PATH))
def test_corruption_is_confined_to_its_path_and_the_tap_counts(corrupt: str) -> None:
    n, k = 256, 512
    g = torch.Generator().manual_seed(0)
    good = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bad = torch.randn(n, k, generator=g).to(torch.bfloat16)
    ops = _ops({"w": DeviceWeight("w", QT.Q4_K, n, k, good)})
    ops.path_overrides = {corrupt: {"w": DeviceWeight("w", QT.Q4_K, n, k, bad)}}
    for path, m in M_OF_PATH.items():
        assert launch.dispatch_path(m, QT.Q4_K, n, k, x_is_bf16=True) == path
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        ops.taken.clear()
        y = ops.linear(x, "w").float()
        assert dict(ops.taken) == {path: 1}
        want = (x.float() @ (bad if path == corrupt else good).float().T)
        assert torch.allclose(y, want, rtol=2e-2, atol=2e-1), (path, corrupt)


@pytest.mark.parametrize("sms,stream_k,f16", [(2, True, True), (132, True, True), (3, False, False)],
                         ids=["one_tile_each", "split_tiles_summed_in_the_kernel", "k_split_atomics_float32"])
def test_wgmma_path_with_f16_x_on_hopper_and_its_confined_corruption(
    sms: int, stream_k: bool, f16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f16 x on an sm_90 GPU sends Q4_K linears of M in [WGMMA_MIN_M, WGMMA_MAX_M] to the
    wgmma GEMM; its f16 result comes straight from the kernel unless a K-split grid larger
    than the GPU adds atomically (then through float32).  The corruption of that path
    reaches exactly its linears."""
    monkeypatch.setattr(launch, "WGMMA_STREAM_K", stream_k)
    # an M the wgmma GEMM takes on sm_90 and the mma GEMM elsewhere (above the GEMVs)
    n, k, m = 256, 2048, max(launch.WGMMA_MIN_M[int(QT.Q4_K)], launch.GEMV_TC_MAX_M + 1) + 7
    g = torch.Generator().manual_seed(1)
    good = torch.randn(n, k, generator=g).to(torch.float16)
    bad = torch.randn(n, k, generator=g).to(torch.float16)
    ops = _ops({"w": DeviceWeight("w", QT.Q4_K, n, k, good)})
    ops.dtype, ops.hopper, ops.sms = torch.float16, True, sms
    plan = launch.wgmma_plan(m, n, k, sms)
    assert launch.wgmma_writes_f16(m, n, k, sms) == f16 == (not plan.atomics)
    assert plan.fixup == (sms == 132) and plan.one_tile_each == (sms == 2)
    calls: list[torch.dtype] = []
    qmatmul = ops._launch.qmatmul

    def spy(x: torch.Tensor, *args: Any, out: torch.Tensor, path: str, workspace: Any = None) -> torch.Tensor:
        calls.append(out.dtype)
        # every wgmma linear gets the teacher's one workspace, no other path one
        assert (workspace is ops._wg_workspace) == (path == "wgmma") and (workspace is None) == (path != "wgmma")
        return qmatmul(x, *args, out=out, path=path)

    ops._launch.qmatmul = spy
    ops.path_overrides = {"wgmma": {"w": DeviceWeight("w", QT.Q4_K, n, k, bad)}}
    x = torch.randn(m, k, generator=g).to(torch.float16)
    y = ops.linear(x, "w")
    assert dict(ops.taken) == {"wgmma": 1} and y.dtype == torch.float16
    assert calls == [torch.float16 if f16 else torch.float32]
    torch.testing.assert_close(y.float(), x.float() @ bad.float().T, rtol=2e-2, atol=2e-1)
    calls.clear()  # a float32 out (the logits) gets float32 from the kernel, rounded once
    logits = torch.empty((m, n), dtype=torch.float32)
    assert ops.linear(x, "w", out=logits) is logits and calls == [torch.float32]
    torch.testing.assert_close(logits, x.float() @ bad.float().T, rtol=2e-2, atol=2e-1)
    ops.hopper = False  # the same call elsewhere: the corruption stays on its path
    ops.taken.clear()
    y = ops.linear(x, "w")
    assert set(ops.taken) == {"mma"}
    torch.testing.assert_close(y.float(), x.float() @ good.float().T, rtol=2e-2, atol=2e-1)


def test_dequant_path_decodes_every_weight_through_one_scratch() -> None:
    # chunks of 128 rows: a weight of 3 chunks (the last one short) and a smaller one
    g = torch.Generator().manual_seed(1)
    shapes = {"big": (320, 256), "small": (64, 128)}
    w = {n: torch.randn(r, c, generator=g).to(torch.bfloat16) for n, (r, c) in shapes.items()}
    ops = _ops({n: DeviceWeight(n, QT.Q4_K, *shapes[n], w[n]) for n in shapes})
    ops.scratch_bytes = 128 * 256 * 2
    for name in ("small", "big", "small"):
        x = torch.randn(70, shapes[name][1], generator=g).to(torch.bfloat16)
        y = ops.linear(x, name).float()
        assert ops.taken["dequant"] > 0
        torch.testing.assert_close(y, x.float() @ w[name].float().T, rtol=2e-2, atol=2e-1)
    # sized at first use for the widest chunk of any weight, never reallocated after
    assert len(ops._scratches) == 1 and ops._scratches[0].numel() == 128 * 256 * 2


@pytest.mark.parametrize(("name", "head_bf16", "want"), [
    ("output.weight", True, torch.bfloat16),
    ("token_embd.weight", True, torch.bfloat16),  # a tied head
    ("output.weight", False, torch.float16),  # the switch off: the head as the layers
    ("blk.0.ffn_up.weight", True, torch.float16),  # a layer's linear stays in f16
])
def test_under_f16_activations_only_the_head_decodes_and_multiplies_in_bf16(
    name: str, head_bf16: bool, want: torch.dtype
) -> None:
    n, k, m = 256, 512, 70
    g = torch.Generator().manual_seed(2)
    w = torch.randn(n, k, generator=g).to(torch.float16)
    ops = _ops({name: DeviceWeight(name, QT.Q4_K, n, k, w)})
    ops.dtype, ops.head_bf16 = torch.float16, head_bf16
    decoded: list[torch.dtype] = []
    qdequant = ops._launch.qdequant

    def spy(data: torch.Tensor, *args: Any, row0: int, out: torch.Tensor) -> torch.Tensor:
        decoded.append(out.dtype)
        return qdequant(data, *args, row0=row0, out=out)

    ops._launch.qdequant = spy
    x = torch.randn(m, k, generator=g).to(torch.float16)
    y = ops.linear(x, name)
    assert dict(ops.taken) == {"dequant": 1} and decoded == [want]
    assert y.dtype == torch.float16  # what the caller gets is still the activations' dtype
    torch.testing.assert_close(y.float(), x.float() @ w.float().T, rtol=2e-2, atol=2e-1)
    logits = torch.empty((m, n), dtype=torch.float32)  # the head into the caller's float32 buffer
    assert ops.linear(x, name, out=logits) is logits
    torch.testing.assert_close(logits, x.float() @ w.float().T, rtol=2e-2, atol=2e-1)


def test_corrupt_path_control_needs_a_case() -> None:
    ctx = Context(ft_id="FT-X", contract_path="c.yaml", subject_name="q4k-teacher-corrupt-path")
    with pytest.raises(ValueError, match=r"needs check\.cases"):
        q4k_teacher_corrupt_path(ctx)


# -- the falsifier's flow for one path, on the CPU (stand-in subjects, F32 reference on the CPU) --
class _Teacher:
    """The F32 teacher seen through a Q4K teacher's interface: logits (optionally scaled
    wrong) and a dispatch tap claiming ``ran``."""

    def __init__(self, path: Path, ran: str | None, noise: float) -> None:
        from teacher.dequant_teacher import DequantTeacher

        self.inner = DequantTeacher.from_gguf(path)
        self.ran, self.noise = ran, noise
        self.ops = types.SimpleNamespace(taken=Counter())

    def vocab_size(self) -> int:
        return int(self.inner.vocab_size())

    def logits_for_batch(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ran:
            self.ops.taken[self.ran] += 1
        out = self.inner.logits_for_batch(ids)
        return out + self.noise * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * out.std()


@pytest.fixture
def cpu_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from teacher.dequant_teacher import DequantTeacher

    real = DequantTeacher.from_gguf.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(DequantTeacher, "from_gguf",
                        classmethod(lambda cls, path, target_vocab=None, device="cpu": real(cls, path, target_vocab)))


@pytest.mark.parametrize(("ran", "noise", "expected"), [
    ("mma", 0.0, "CORROBORATED"),
    (None, 0.0, "FALSIFIED"),  # the forward never ran the path: the item proves nothing
    ("mma", 1.0, "FALSIFIED"),  # wrong logits on the path
])
def test_path_item_flow(
    cpu_reference: None, ran: str | None, noise: float, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from falsifiers.q4k_teacher import logit_parity

    # dispatch as off sm_90 on any machine: on an H100/H200 the wgmma GEMM takes tiny's mma range
    monkeypatch.setattr(launch, "is_hopper", lambda dev: False)

    ctx = Context(ft_id="FT-Q4K-TEACHER-003", contract_path="c.yaml", subject_name="s", model="tiny",
                  case="mma", thresholds={"cosine_min": 0.999},
                  subject_factory=lambda ctx: lambda path: _Teacher(path, ran, noise))
    logit_parity(ctx)
    verdict, why = ctx.verdict()
    assert str(verdict) == expected, why
    assert ctx.evidence.measurements["m_rows_per_linear"]["value"] == m_for_path("mma", _shapes("tiny"))[0]


def test_unreachable_path_is_not_run_with_the_file_types() -> None:
    from falsifiers.q4k_teacher import logit_parity
    from harness.verdict import NotRun

    ctx = Context(ft_id="FT-Q4K-TEACHER-003", contract_path="c.yaml", subject_name="s", model="smollm2-135m",
                  case="gemv_tc", thresholds={"cosine_min": 0.999}, subject_factory=lambda ctx: None)
    _shapes("smollm2-135m")
    with pytest.raises(NotRun, match="Q4_1"):
        logit_parity(ctx)


def test_wgmma_item_off_sm90_is_not_applicable_not_a_missing_requirement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where no linear dispatches to the item's path (here: wgmma without an sm_90 GPU), the
    item raises NotApplicable: NOT RUN, and no obstacle to sign-off (harness.report)."""
    from falsifiers.q4k_teacher import logit_parity
    from harness.verdict import NotApplicable

    # any GPU here reads as not sm_90 (on an H100/H200 the item would run for real)
    monkeypatch.setattr(launch, "is_hopper", lambda dev: False)

    ctx = Context(ft_id="FT-Q4K-TEACHER-003", contract_path="c.yaml", subject_name="s", model="tiny",
                  case="wgmma", thresholds={"cosine_min": 0.999}, subject_factory=lambda ctx: None)
    _shapes("tiny")
    with pytest.raises(NotApplicable, match="wgmma needs sm_90"):
        logit_parity(ctx)


# -- where the weights live ---------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[144 * 37, 210 * 5, 1, 256, 0, 4096 * 144], [7], []])
def test_the_weight_arena_packs_every_tensor_aligned_and_apart(sizes: list[int]) -> None:
    from teacher.q4k_teacher import ARENA_ALIGN, arena_layout

    offsets, total = arena_layout(sizes)
    assert len(offsets) == len(sizes)
    assert all(off % ARENA_ALIGN == 0 for off in offsets)
    spans = list(zip(offsets, [o + s for o, s in zip(offsets, sizes, strict=True)], strict=True))
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))  # in order, no overlap
    assert total >= max((end for _, end in spans), default=1)
    # no more padding than the alignment needs: the GPU holds the file's bytes, not a copy per tensor
    assert total - sum(sizes) < ARENA_ALIGN * max(len(sizes), 1)


def test_the_weight_arena_refuses_a_negative_size() -> None:
    from teacher.q4k_teacher import arena_layout

    with pytest.raises(ValueError, match="-3 bytes"):
        arena_layout([16, -3])
