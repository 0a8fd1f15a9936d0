"""``q4k report RESULTS.jsonl [-o DIR]``: rebuild the report from a results.jsonl alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.report import build_report
from harness.results import RunData, read_results


def is_results_file(run: RunData) -> bool:
    """A run header, or at least one item result with its node id (a killed run may have
    lost its header line; a README or a JSON list has neither)."""
    return bool(run.headers) or any(r.get("type") == "result" and r.get("nodeid") for r in run.results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, help="a run's results.jsonl")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="directory for report.html, results.json, junit.xml (default: beside RESULTS)")


def run(args: argparse.Namespace) -> int:
    if not args.results.is_file():
        print(f"q4k report: {args.results}: no such file", file=sys.stderr)
        return 2
    run = read_results(args.results)
    if not is_results_file(run):
        print(f"q4k report: {args.results} is not a results.jsonl: none of its {len(run.corrupt_lines) + len(run.results)} "
              f"line(s) is a run header or an item result written by `q4k falsify` "
              f"(give reports/<run-id>/results.jsonl)", file=sys.stderr)
        return 2
    built = build_report(args.results, args.output)
    overall = built.overall
    print(f"{overall['label']}: {'; '.join(overall['headline']) or 'no items'}"
          + (f"; {overall['collection_errors']} collection error(s)" if overall["collection_errors"] else "")
          + (f"; {overall['corrupt_lines']} corrupt line(s)" if overall["corrupt_lines"] else ""))
    for name, path in built.paths.items():
        print(f"{name}: {path}")
    return 0
