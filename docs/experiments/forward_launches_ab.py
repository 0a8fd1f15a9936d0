"""Does the forward's kernel count hold the 1 x 512 teacher back? (session 29)

At 512 tokens the layer's tensors are a few MB, so its elementwise kernels take a few
microseconds each, about what a graphed launch costs; session 26's profile put RoPE,
SiLU and residuals at 1.64 ms and attention at 1.91 ms of a 20.45-ms forward. Session 29
cut the kernels of three steps, keeping every value bit-identical:

- RoPE: the tables are cast and laid out once a forward (``rope_for``), and a call is
  x * cos + swap(x) * sin with each product rounded before the add: four kernels where
  the textbook form took nine (two table casts, four products, a sub, an add, a cat);
- grouped-query attention without a mask: SDPA's flash kernel reads each group's KV
  head in place (``enable_gqa``) where the forward copied K and V out per query head;
- q / k / v biases: cast to the activation dtype once (``cast_once``), not at every add.

This times the qwen2.5-7b-shape teacher's 1 x 512 and 4 x 512 forwards (``SHAPES``), graphed, with
the tree's ``hidden_states`` and with the one of the forward given by ``FORWARD_BASE``
(a copy of an earlier teacher/forward.py), for the Q4K teacher and the dense bf16
baseline, interleaved over four rounds, and checks that each backend's logits are
bit-identical between the two (and their minimum cosine, for a forward that is not).

Session 30: ``FORWARD_BASE`` = e23c053's forward, against the tree's norm on torch's fused
kernel (``rms_norm``: one pass where the textbook form took six kernels; not bit-identical,
the sum of squares runs in another order).

    git show 2e37ad8:teacher/forward.py > /tmp/forward_base.py   # the forward before session 29
    PYTHONPATH=$PWD FORWARD_BASE=/tmp/forward_base.py python3 docs/experiments/forward_launches_ab.py

Session 29's run on an H100 (SHAPES=1x512): ``docs/results/forward-launches-ab-h100.json``.

writes $OUT/forward-launches-ab.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

import teacher.runtime as runtime
from teacher.bench import _dense_bf16, _q4k, _time_forward
from teacher.models import resolve_model


def _module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("forward_base", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"FORWARD_BASE={path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    base = _module(os.environ["FORWARD_BASE"])
    versions = {"base": base.hidden_states, "tree": runtime.hidden_states}
    shapes = [(int(b), int(t)) for b, t in (x.split("x") for x in os.environ.get("SHAPES", "1x512,4x512").split(","))]
    rounds, reps = int(os.environ.get("ROUNDS", "4")), 10
    path = resolve_model("qwen2.5-7b-shape")
    res: dict[str, Any] = {"what": __doc__.split("\n\n")[0], "gpu": torch.cuda.get_device_name(),
                           "seconds": {}, "bit_identical": {}, "min_cosine": {}}
    for backend, build in (("q4k", _q4k), ("dense-bf16", _dense_bf16)):
        teacher = build(path, 0)
        for b, t in shapes:
            ids = torch.randint(0, teacher.vocab_size(), (b, t), generator=torch.Generator().manual_seed(t + b))
            key = f"{backend} {b}x{t}"
            times: dict[str, list[float]] = {v: [] for v in versions}
            logits = {}
            for r in range(rounds):
                for name, fn in versions.items():
                    runtime.hidden_states = fn
                    teacher.runner.drop_graphs()  # the next call captures (eager only on a fresh teacher)
                    if r == 0:
                        logits[name] = teacher.logits_for_batch(ids).float()
                    times[name].append(_time_forward(teacher, ids, reps, torch.float32))
                    print(f"{key} round {r} {name:<5} {times[name][-1] * 1e3:7.2f} ms", flush=True)
            runtime.hidden_states = versions["tree"]
            res["seconds"][key] = times
            res["bit_identical"][key] = bool(torch.equal(logits["base"], logits["tree"]))
            cos = torch.nn.functional.cosine_similarity(logits["base"], logits["tree"], dim=-1)
            res["min_cosine"][key] = float(cos.min())
            del logits
        del teacher
        torch.cuda.empty_cache()
    res["median_ms"] = {k: {v: statistics.median(s) * 1e3 for v, s in t.items()} for k, t in res["seconds"].items()}
    res["tree_over_base"] = {k: m["tree"] / m["base"] for k, m in res["median_ms"].items()}
    print(json.dumps({k: res[k] for k in ("median_ms", "tree_over_base", "bit_identical", "min_cosine")}, indent=1), flush=True)
    (Path(os.environ.get("OUT", ".")) / "forward-launches-ab.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
