"""``q4k report RESULTS.jsonl [-o DIR]``: rebuild the report from a results.jsonl alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.report import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, help="a run's results.jsonl")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="directory for report.html, results.json, junit.xml (default: beside RESULTS)")


def run(args: argparse.Namespace) -> int:
    if not args.results.is_file():
        print(f"q4k report: {args.results}: no such file")
        return 2
    built = build_report(args.results, args.output)
    overall = built.overall
    counts = ", ".join(f"{n} {v}" for v, n in overall["counts"].items() if n)
    print(f"{overall['label']}: {counts or 'no items'}"
          + (f"; {overall['collection_errors']} collection error(s)" if overall["collection_errors"] else "")
          + (f"; {overall['corrupt_lines']} corrupt line(s)" if overall["corrupt_lines"] else ""))
    for name, path in built.paths.items():
        print(f"{name}: {path}")
    return 0
