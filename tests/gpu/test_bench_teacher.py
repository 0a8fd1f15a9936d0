"""``q4k bench teacher``'s measurement on the tiny model (CUDA only): every shape has its
own working set (its graphs alone), the row's is the largest, and each ratio is
recomputable from the rows it names."""

from __future__ import annotations

import math

import pytest

from teacher.models import resolve_model


def test_bench_teacher_rows_and_ratios() -> None:
    from teacher.bench import bench_teacher

    shapes = [(1, 8), (2, 40), (1, 70)]  # GEMV, mma and decode + cuBLAS paths
    res = bench_teacher(resolve_model("tiny"), shapes, reps=1, backends=("q4k", "dense-bf16"))
    rows = res["backends"]
    for name in ("q4k", "dense-bf16"):
        row = rows[name]
        per = [row[f"{b}x{s}"] for b, s in shapes]
        for (b, s), r in zip(shapes, per, strict=True):
            assert r["tokens_per_s"] == pytest.approx(b * s / r["median_s"])
            assert r["working_set_gib"] < r["peak_f32_logits_gib"]
        assert row["working_set_gib"] == max(r["working_set_gib"] for r in per)
    assert rows["q4k"]["activation_dtype"] == "float16"
    ratios = res["ratios"]
    assert math.isclose(ratios["working_set_q4k_over_dense"],
                        rows["q4k"]["working_set_gib"] / rows["dense-bf16"]["working_set_gib"])
    for b, s in shapes:
        key = f"{b}x{s}_tokens_per_s_q4k_over_dense"
        assert math.isclose(ratios[key], rows["q4k"][f"{b}x{s}"]["tokens_per_s"]
                            / rows["dense-bf16"][f"{b}x{s}"]["tokens_per_s"])


def test_isolated_backends_each_run_in_a_fresh_process() -> None:
    """With ``isolate`` no backend inherits another's CUDA modules and workspaces: each row
    comes from a process of its own, neither this one nor the other backend's."""
    import os

    from teacher.bench import bench_teacher

    res = bench_teacher(resolve_model("tiny"), [(1, 8)], reps=1, backends=("q4k", "dense-bf16"), isolate=True)
    assert res["backends_isolated"] is True
    pids = [row["pid"] for row in res["backends"].values()]
    assert os.getpid() not in pids and len(set(pids)) == 2, pids
    for row in res["backends"].values():
        assert 0 < row["working_set_gib"] < row["peak_f32_logits_gib"], row
    assert res["ratios"]["working_set_q4k_over_dense"] > 0


def test_profile_busy_times_come_from_their_own_kind_of_forward() -> None:
    """The graphed host gap is the wall less the busy time of one profiled *graphed* call:
    the profiler must see the replayed graph's kernels (busy > 0), and a single stream
    cannot be busy for longer than the call took, so the gap is never negative (it was,
    at 4,096 tokens, against the unprofiled wall). The eager profile's stages cover its
    busy time."""
    import torch

    from teacher.bench import BACKENDS, profile_forward

    teacher = BACKENDS["q4k"](resolve_model("tiny"), 0)
    ids = torch.randint(0, teacher.vocab_size(), (2, 40), generator=torch.Generator().manual_seed(0))
    prof = profile_forward(teacher, ids, torch.float32)
    assert 0 < prof["gpu_busy_ms"] <= prof["eager_wall_ms"] * 1.02, prof
    assert 0 < prof["gpu_busy_graph_ms"] <= prof["graph_wall_profiled_ms"], prof
    assert prof["host_gap_graph_ms"] == pytest.approx(prof["graph_wall_profiled_ms"] - prof["gpu_busy_graph_ms"])
    assert sum(prof["gpu_ms_by_stage"].values()) == pytest.approx(prof["gpu_busy_ms"])
