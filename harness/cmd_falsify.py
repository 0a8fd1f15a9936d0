"""``q4k falsify [--signoff] [--teacher PATH] [--model NAME=PATH]... [--student NAME|PATH]
[pytest options...]``: run the contracts' falsification tests.

Runs pytest in this process on the contracts directory with the harness plugin
(registered explicitly, with the installed entry point blocked so it is never
loaded twice) and prints where the report is. Options it does not know are
passed to pytest unchanged, e.g. ``q4k falsify --signoff -k VOCAB -x``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

accepts_extra_args = True  # harness.cli passes unknown options through as args.extra_args


EPILOG = """\
Any other option is passed to pytest unchanged, for example
  q4k falsify -k VOCAB -x          select items by name, stop at the first failure
  q4k falsify --signoff -n auto    sign-off run, one pytest-xdist worker per GPU
  q4k falsify --collect-only -q    list the contract items without running them
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the epilog's line breaks
    parser.add_argument("--signoff", action="store_true",
                        help="fail unless every test is CORROBORATED and every control FALSIFIED")
    parser.add_argument("--contracts-dir", type=Path, default=Path("contracts"), help="default: ./contracts")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"), help="default: ./reports")
    parser.add_argument("--run-id", default=None, help="report folder name (default: UTC time and pid)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run --run-id names: run only the items it has no result for "
                             "(e.g. after a time limit killed it); the report covers both sessions")
    parser.add_argument("--teacher", default=None, metavar="PATH",
                        help="sign off this GGUF file: every item that names a model runs on it")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="bind a model name the contracts use to a GGUF file (repeatable)")
    parser.add_argument("--student", default=None, metavar="NAME|PATH",
                        help="student paired with --teacher (default: synthetic, sized to its vocab)")
    # argparse's own usage line, plus what it cannot know: the options that go to pytest
    parser.usage = parser.format_usage().removeprefix("usage: ").strip() + " [pytest options]"


def pytest_argv(args: argparse.Namespace) -> list[str]:
    extra = list(getattr(args, "extra_args", []) or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    argv = [
        str(args.contracts_dir),
        "-p", "no:q4k_contracts", "-p", "harness.plugin",
        "--contracts-dir", str(args.contracts_dir),
        "--reports-dir", str(args.reports_dir),
        "-rfEs",  # say why each item failed, errored or was skipped (NOT RUN / UNBOUND reasons)
        # installed, the plugin's packages are marked for assertion rewriting, but this
        # process imported them before pytest started; they hold no test asserts
        "-W", "ignore::pytest.PytestAssertRewriteWarning",
    ]
    if args.signoff:
        argv.append("--signoff")
    if args.run_id:
        argv += ["--run-id", args.run_id]
    if args.resume:
        argv.append("--resume")
    if args.teacher:
        argv += ["--teacher", str(args.teacher)]
    for binding in args.model:
        argv += ["--model", binding]
    if args.student:
        argv += ["--student", args.student]
    return argv + extra


def _selection(argv: list[str]) -> str:
    """The -k/-m options of a pytest command line, as typed ("" when there are none)."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-k", "-m") and i + 1 < len(argv):
            found.append(f"{arg} {argv[i + 1]!r}")
        elif arg.startswith(("-k", "-m")) and len(arg) > 2 and not arg.startswith("--"):
            found.append(f"{arg[:2]} {arg[2:]!r}")
    return " ".join(found)


def run(args: argparse.Namespace) -> int:
    import pytest  # imported here so `q4k --help` stays fast

    if not args.contracts_dir.is_dir():
        print(f"q4k falsify: contracts directory {args.contracts_dir} does not exist", file=sys.stderr)
        return 2
    argv = pytest_argv(args)
    code = int(pytest.main(argv))
    if code == int(pytest.ExitCode.NO_TESTS_COLLECTED):
        # pytest's own "no tests ran" does not say that a selection emptied the run
        selection = _selection(argv)
        print(f"q4k falsify: {selection or 'the run'} selected no contract item in {args.contracts_dir}; "
              f"nothing ran and no report was written (list the items with --collect-only -q)",
              file=sys.stderr)
        return code
    from harness.results import read_latest

    run_id = args.run_id or read_latest(args.reports_dir)
    if run_id and (args.reports_dir / run_id / "report.html").exists():
        print(f"q4k falsify: report {args.reports_dir / run_id / 'report.html'} (exit {code})")
    else:
        print(f"q4k falsify: no report was written (exit {code})")
    return code
