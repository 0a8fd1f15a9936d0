"""``q4k bench kernels`` end to end on a small shape (CUDA only): the JSON has a
row per (format, M, path) with consistent, finite measurements."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from cupy_kernels import launch


def test_bench_kernels_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "harness.cli", "bench", "kernels", "--types", "Q4_K,Q6_K", "--m", "1,8,16,32,64",
           "--shapes", "512x1024", "--replays", "3", "--check", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["type"], r["M"]) for r in rows} == {(t, m) for t in ("Q4_K", "Q6_K") for m in (1, 8, 16, 32, 64)}
    # each row ran the path the teacher's dispatch picks (f16 x, this GPU), with the
    # teacher's x: f16, handed to the GEMVs as bf16 as the teacher does
    hopper = bool(launch.is_hopper(0))
    for r in rows:
        want = launch.dispatch_path(r["M"], GGMLQuantizationType[r["type"]], r["N"], r["K"],
                                    x_is_bf16=True, x_is_f16=True, hopper=hopper)
        assert r["path"] == want, r
        assert r["x_dtype"] == ("bf16" if want.startswith("gemv") else "f16"), r
    # both formats run the GEMVs below the wgmma GEMM's range (all of M <= 32 off sm_90)
    for t in ("Q4_K", "Q6_K"):
        lo = launch.WGMMA_MIN_M[int(GGMLQuantizationType[t])]
        gemv_ms = {m for m in (1, 8, 16, 32) if not (hopper and m >= lo)}
        assert {r["M"] for r in rows if r["type"] == t and r["x_dtype"] == "bf16"} == gemv_ms, t
    for r in rows:
        values, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[r["type"]]]  # gguf: the independent sizes
        wbytes = r["N"] * r["K"] // values * nbytes
        assert r["weight_bytes"] == wbytes
        # every ratio is recomputable from the row's own measurements
        assert math.isclose(r["weight_GBps"], wbytes / r["median_us"] / 1e3, rel_tol=1e-9)
        # the headline: the read floor for small M, torch above (recomputed, not copied)
        metric = "frac_of_read_floor" if r["M"] <= result["headline_read_max_m"] else "speedup_vs_torch_bf16"
        assert r["headline"] == {"metric": metric, "value": r[metric]}
        assert math.isclose(r["frac_of_read_floor"], r["read_floor_us"] / r["median_us"], rel_tol=1e-9)
        assert math.isclose(r["speedup_vs_torch_bf16"], r["torch_bf16_us"] / r["median_us"], rel_tol=1e-9)
        # a kernel that must decode cannot beat a plain read of its bytes by much
        assert 0 < r["frac_of_read_floor"] < 1.5, r
    for r in rows:
        if r["M"] == 1:  # --check: the default path against the f32 dequant
            assert r["rel_err_vs_f32_dequant"] is not None and r["rel_err_vs_f32_dequant"] < 1e-5
