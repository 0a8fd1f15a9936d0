"""The ``q4k`` command. Each verb lives in its own module, imported only when used.

A verb module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# verb -> (module, one-line help). Modules are imported lazily so `q4k --help`
# works without torch/cupy, and one broken verb cannot break the others.
VERBS: dict[str, tuple[str, str]] = {
    "falsify": ("harness.cmd_falsify", "run the contracts' falsification tests and write a report"),
    "report": ("harness.cmd_report", "rebuild report.html/results.json/junit.xml from a results.jsonl"),
    "inspect": ("teacher.cmd_inspect", "describe a GGUF file and say whether the teacher can serve it"),
    "synth": ("teacher.cmd_synth", "write a synthetic Q4_K_M GGUF model from a recipe"),
    "distill": ("teacher.cmd_distill", "distil a student from a frozen GGUF teacher"),
    "bench": ("cupy_kernels.cmd_bench", "benchmark the quantized kernels or the teacher on a GPU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="q4k",
        description="Falsification harness for a Q4K-native frozen distillation teacher.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        # allow_abbrev=False: with abbreviations on, `q4k distill --teacher T` was silently read
        # as --teacher-backend T and failed with a baffling "invalid choice"
        p = sub.add_parser(verb, help=help_text, description=help_text, allow_abbrev=False)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=f"'q4k {verb}' is not available in this build ({module} missing)")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Verbs that wrap another tool (falsify -> pytest) take the options they do
    # not know through to it; for every other verb an unknown option is an error.
    args, extra = parser.parse_known_args(argv)
    run = getattr(args, "_run", None)
    if extra:
        if run is None or not getattr(sys.modules.get(run.__module__), "accepts_extra_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra_args = extra
    if args.verb is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"q4k: {args._missing}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
