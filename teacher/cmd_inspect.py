"""``q4k inspect FILE [--json]``: what a GGUF file is and whether the teacher serves it.

Exit status 0 when the teacher can serve the file, 1 when it refuses it (the
reasons are printed, naming the file, the tensor and the type), 2 when the file
is not a readable GGUF file at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a GGUF file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-hash", action="store_true", help="skip the sha256 (reads the whole file)")


def run(args: argparse.Namespace) -> int:
    from teacher.gguf_file import GGUFError
    from teacher.gguf_inspect import inspect_gguf, render_text

    try:
        report = inspect_gguf(args.file, sha256=not args.no_hash)
    except GGUFError as exc:
        print(f"q4k inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if args.json else render_text(report))
    return 0 if report.servable else 1
