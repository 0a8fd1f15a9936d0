"""``q4k synth``: write a synthetic Q4_K_M GGUF model from a named recipe."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from teacher.synth import RECIPES, plan_tensors, write_gguf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=sorted(RECIPES), help="named model recipe")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output file (default: ./<recipe>.gguf); use 'q4k falsify' to fill the cache",
    )
    parser.add_argument(
        "--weights",
        choices=("quantized", "random-blocks"),
        default=None,
        help="override how weights are made (default: the recipe's)",
    )
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--plan", action="store_true", help="print the tensor plan, write nothing")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    if args.weights is not None:
        recipe = replace(recipe, weights=args.weights)
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    if args.plan:
        total = 0
        for t in plan_tensors(recipe):
            total += t.nbytes
            print(
                f"{t.name:32s} {t.qtype.name:5s} {'x'.join(map(str, t.shape)):>14s} {t.nbytes:>12d}"
            )
        print(f"total tensor bytes {total} ({total / 2**30:.3f} GiB)")
        return 0
    out: Path = args.output or Path(f"{recipe.name}.gguf")
    if out.exists() and not args.force:
        print(f"q4k synth: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    t0 = time.perf_counter()
    try:
        write_gguf(recipe, tmp, progress=not args.no_progress)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    size = out.stat().st_size
    print(f"wrote {out}: {size} bytes ({size / 2**30:.3f} GiB) in {dt:.1f} s")
    return 0
