"""The pytest plugin end to end, with pytester: items, outcomes, sign-off, errors, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.report import build_report
from harness.results import read_results

ROOT = Path(__file__).resolve().parents[1]
# the plugin module is already imported in this process (see the preload_bindings fixture): no rewrite warning
PLUGIN_ARGS = ("-p", "no:q4k_contracts", "-p", "harness.plugin", "-W", "ignore::pytest.PytestAssertRewriteWarning")

# Falsifiers and subjects for the plugin tests, registered by the test project's conftest.
CONFTEST = '''
import os, time
from harness.registry import falsifier, subject

@subject("t-good")
def t_good(ctx):
    return 1.0

@subject("t-bad")
def t_bad(ctx):
    return 10.0

@subject("t-also-good")
def t_also_good(ctx):
    return 1.5

@falsifier("t_below", thresholds={"limit": float})
def t_below(ctx):
    ctx.check("value", ctx.subject(), "<=", ctx.threshold("limit"), "GB")

@falsifier("t_crash")
def t_crash(ctx):
    raise RuntimeError("kaboom in the falsifier")

@falsifier("t_oom")
def t_oom(ctx):
    raise MemoryError("Tried to allocate 12.00 GiB; 3.10 GiB free")

@falsifier("t_not_run")
def t_not_run(ctx):
    ctx.not_run("the widget is not plugged in")

@falsifier("t_moot")
def t_moot(ctx):
    ctx.not_applicable("this machine has no widget port at all")

@falsifier("t_no_check")
def t_no_check(ctx):
    ctx.measure("x", 1)

@falsifier("t_slow")
def t_slow(ctx):
    if ctx.param("sleep"):
        time.sleep(float(ctx.param("sleep")))
    ctx.check("value", ctx.subject(), "<=", 5.0)
'''

PLANNED = '''
from harness import registry
registry.plan(falsifiers=("t_later",), subjects=("t-later-subject",))
'''


def _contract(tests: str, *, extra: str = "") -> str:
    return textwrap.dedent("""\
        metadata:
          name: demo
          version: "1"
        {extra}
        falsification_tests:
        """).format(extra=extra) + textwrap.indent(textwrap.dedent(tests), "  ")


def _ft(ft_id: str, falsifier: str, *, subject: str = "t-good", controls: str = "[]",
        thresholds: str = "", extra: str = "", rule: str = "a rule") -> str:
    lines = [
        f"- id: {ft_id}",
        f"  rule: {json.dumps(rule)}",
        "  prediction: the value stays low",
        "  if_fails: the budget is blown",
        "  check:",
        f"    falsifier: {falsifier}",
        f"    subject: {subject}",
        f"    controls: {controls}",
    ]
    if thresholds:
        lines.append(f"    thresholds: {thresholds}")
    if extra:
        lines += [f"    {ln}" for ln in extra.splitlines()]
    return "\n".join(lines) + "\n"


pytestmark = pytest.mark.usefixtures("preload_bindings")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST + PLANNED)
    (pytester.path / "contracts").mkdir()
    return pytester


def write(p: pytest.Pytester, name: str, text: str) -> Path:
    path = p.path / "contracts" / name
    path.write_text(text)
    return path


def run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest("contracts", *PLUGIN_ARGS, "--run-id", "r1", "-rfEs", *args)


def results(p: pytest.Pytester) -> dict[str, dict]:
    data = read_results(p.path / "reports" / "r1" / "results.jsonl")
    return {r["nodeid"]: r for r in data.results}


def test_prediction_and_control_items_with_ft_ids_in_node_ids(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-A-001", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}", extra="models: [m1, m2]")
    ))
    result = run(project, "--collect-only", "-q")
    ids = {ln.strip() for ln in result.outlines if "::" in ln}
    assert ids == {
        "contracts/a.yaml::FT-A-001[m1]", "contracts/a.yaml::FT-A-001[m1]::control[t-bad]",
        "contracts/a.yaml::FT-A-001[m2]", "contracts/a.yaml::FT-A-001[m2]::control[t-bad]",
    }
    assert not (project.path / "reports").exists()  # listing items is not a run


def test_verdicts_map_to_pytest_outcomes(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-OK", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}")
        + _ft("FT-FALSIFIED", "t_below", subject="t-bad", thresholds="{limit: 2.0}")
        + _ft("FT-BLIND", "t_below", controls="[t-also-good]", thresholds="{limit: 2.0}")
        + _ft("FT-CRASH", "t_crash")
        + _ft("FT-NOCHECK", "t_no_check")
        + _ft("FT-NOTRUN", "t_not_run")
        + _ft("FT-UNBOUND", "t_later", subject="t-later-subject", controls="[t-later-subject]")
        + _ft("FT-MISSING-PKG", "t_below", thresholds="{limit: 2.0}", extra="requires: ['package:no_such_pkg_q4k']")
    ))
    result = run(project)
    by_id = results(project)
    verdicts = {k.split("::", 1)[1]: (v["verdict"], v["passed"]) for k, v in by_id.items()}
    assert verdicts == {
        "FT-OK": ("CORROBORATED", True),
        "FT-OK::control[t-bad]": ("FALSIFIED", True),
        "FT-FALSIFIED": ("FALSIFIED", False),
        "FT-BLIND": ("CORROBORATED", True),
        "FT-BLIND::control[t-also-good]": ("CORROBORATED", False),
        "FT-CRASH": ("ERROR", False),
        "FT-NOCHECK": ("ERROR", False),
        "FT-NOTRUN": ("NOT RUN", None),
        "FT-UNBOUND": ("UNBOUND", None),
        "FT-UNBOUND::control[t-later-subject]": ("UNBOUND", None),
        "FT-MISSING-PKG": ("NOT RUN", None),
    }
    result.assert_outcomes(passed=3, failed=4, skipped=4)
    out = result.stdout.str()
    assert "the falsifier is blind to t-also-good" in out
    assert "the widget is not plugged in" in out
    assert "no_such_pkg_q4k" in out
    assert "kaboom in the falsifier" in by_id["contracts/a.yaml::FT-CRASH"]["traceback"]
    assert by_id["contracts/a.yaml::FT-OK"]["comparisons"][0]["limit"] == 2.0  # threshold from the YAML
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_out_of_memory_is_error_with_numbers_and_the_run_goes_on(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-1-OOM", "t_oom") + _ft("FT-2-AFTER", "t_below", thresholds="{limit: 2.0}")
    ))
    result = run(project)
    result.assert_outcomes(passed=1, failed=1)
    oom = results(project)["contracts/a.yaml::FT-1-OOM"]
    assert oom["verdict"] == "ERROR"
    assert "out of memory (MemoryError)" in oom["reason"] and "12.00 GiB" in oom["reason"]


def test_signoff_fails_with_unbound_or_not_run(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-OK", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}")
        + _ft("FT-LATER", "t_later", subject="t-later-subject")
    ))
    plain = run(project)
    assert plain.ret == pytest.ExitCode.OK  # UNBOUND is a skip in a normal run
    signoff = project.runpytest("contracts", *PLUGIN_ARGS, "--run-id", "r2", "--signoff")
    assert signoff.ret != 0
    signoff.assert_outcomes(passed=2, failed=1)
    assert "NOT READY" in signoff.stdout.str()


def test_signoff_passes_when_everything_is_corroborated(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(_ft("FT-OK", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}")))
    result = project.runpytest("contracts", *PLUGIN_ARGS, "--run-id", "r1", "--signoff")
    assert result.ret == pytest.ExitCode.OK
    assert "SIGN-OFF READY" in result.stdout.str()
    overall = build_report(project.path / "reports" / "r1" / "results.jsonl").overall
    assert overall["ready"] is True


def test_signoff_stays_ready_when_an_item_is_not_applicable_here(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-OK", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}") + _ft("FT-MOOT", "t_moot")
    ))
    result = project.runpytest("contracts", *PLUGIN_ARGS, "--run-id", "r1", "--signoff")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert "SIGN-OFF READY" in result.stdout.str()
    moot = results(project)["contracts/a.yaml::FT-MOOT"]
    assert moot["verdict"] == "NOT RUN" and moot["applicable"] is False
    assert "no widget port" in moot["reason"]
    assert results(project)["contracts/a.yaml::FT-OK"]["applicable"] is True


GOOD_FT = _ft("FT-OK", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}")
BROKEN = {
    # case: (contract text, field named, text on the faulty line)
    "yaml-syntax": (_contract(GOOD_FT.replace("FT-OK", "FT-Y").replace("rule: \"a rule\"", "rule: [oops")), "<yaml>", None),
    "missing-id": (_contract(GOOD_FT.replace("- id: FT-OK\n  rule", "- rule")), "falsification_tests[0].id", "- rule:"),
    "missing-rule": (_contract(GOOD_FT.replace("FT-OK", "FT-R").replace("  rule: \"a rule\"\n", "")), "FT-R.rule", "- id: FT-R"),
    "missing-prediction": (_contract(GOOD_FT.replace("FT-OK", "FT-P").replace("  prediction: the value stays low\n", "")), "FT-P.prediction", "- id: FT-P"),
    "yaml-alias": (_contract(GOOD_FT.replace("FT-OK", "FT-AL").replace("rule: \"a rule\"", "rule: &r a rule")
                             + "  - {id: FT-AL2, rule: *r, prediction: p}\n"), "<yaml>", "*r"),
    "unknown-falsifier": (_contract(GOOD_FT.replace("FT-OK", "FT-F").replace("t_below", "t_belw")), "FT-F.check.falsifier", "t_belw"),
    "threshold-type": (_contract(GOOD_FT.replace("FT-OK", "FT-T").replace("{limit: 2.0}", "{limit: two}")), "FT-T.check.thresholds.limit", "limit: two"),
    "unknown-control": (_contract(GOOD_FT.replace("FT-OK", "FT-C").replace("[t-bad]", "[t-bda]")), "FT-C.check.controls[0]", "t-bda"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_contract_is_one_collection_error_and_the_others_run(project: pytest.Pytester, case: str) -> None:
    text, field_name, line_text = BROKEN[case]
    write(project, "a_good.yaml", _contract(GOOD_FT))
    bad = write(project, "b_bad.yaml", text)
    result = run(project)
    result.assert_outcomes(passed=2, errors=1)  # the good contract's prediction and control still ran
    out = result.stdout.str()
    assert out.count("contract error:") == 1
    error_line = next(ln for ln in result.outlines if "contract error:" in ln)
    assert "b_bad.yaml:" in error_line and f"field '{field_name}'" in error_line
    if line_text is not None:
        expected = next(n for n, ln in enumerate(bad.read_text().splitlines(), 1) if line_text in ln)
        assert f"b_bad.yaml:{expected}:" in error_line
    data = read_results(project.path / "reports" / "r1" / "results.jsonl")
    assert [e["field"] for e in data.collection_errors] == [field_name]
    assert build_report(data.path).overall["ready"] is False


def test_script_in_contract_text_is_escaped_in_the_report(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-XSS", "t_below", thresholds="{limit: 2.0}", rule="<script>alert('x')</script> & more"),
        extra="equations:\n  - id: EQ-<b>bold</b>\n",
    ))
    run(project)
    html = (project.path / "reports" / "r1" / "report.html").read_text()
    assert "<script>" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(" in html and "EQ-&lt;b&gt;bold" in html


def test_report_lists_non_executable_parts_as_not_applicable(project: pytest.Pytester) -> None:
    extra = textwrap.dedent("""\
        equations:
          - id: EQ-MEM
            formula: "bytes = rows * cols / 256 * 144"
        proof_obligations:
          - id: PO-FROZEN
            property: nothing reaches autograd
        kani_harnesses:
          - id: KANI-1
            harness: verify_decode
        qa_gate:
          id: QA-GATE-1
        vendor_extension: {x: 1}
        """)
    write(project, "a.yaml", _contract(_ft("FT-OK", "t_below", thresholds="{limit: 2.0}"), extra=extra))
    result = run(project)
    result.assert_outcomes(passed=1)
    html = (project.path / "reports" / "r1" / "report.html").read_text()
    section = html.split("Not applicable (not executed)", 1)[1].split("<table>", 1)[1].split("</table>", 1)[0]
    for name in ("equations", "proof_obligations", "kani_harnesses", "qa_gate", "EQ-MEM", "PO-FROZEN", "KANI-1"):
        assert name in section
    assert section.count("not applicable (not executed)") == 4
    assert "passed" not in section.lower() and "CORROBORATED" not in section
    assert "vendor_extension" in html.split("Unknown keys", 1)[1]


def test_results_json_junit_and_latest(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-OK", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}") + _ft("FT-CRASH", "t_crash")
    ))
    run(project)
    reports = project.path / "reports"
    assert (reports / "latest").read_text().strip() == "r1"
    rows = json.loads((reports / "r1" / "results.json").read_text())
    assert {(r["id"], r["control"], r["verdict"]) for r in rows} == {
        ("FT-OK", None, "CORROBORATED"), ("FT-OK", "t-bad", "FALSIFIED"), ("FT-CRASH", None, "ERROR"),
    }
    assert all({"id", "control", "verdict", "reason", "measurements"} <= set(r) for r in rows)
    import xml.etree.ElementTree as ET

    suite = ET.parse(reports / "r1" / "junit.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("errors") == "1"
    data = read_results(reports / "r1" / "results.jsonl")
    header = data.headers[0]
    assert header["run_id"] == "r1" and "python" in header["environment"]
    assert len(data.expected) == 3 and not data.unfinished and not data.interrupted


def test_plugin_writes_nothing_for_a_run_without_contracts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x():\n    assert True\n")
    result = pytester.runpytest(*PLUGIN_ARGS)
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "reports").exists()


def start_run_stuck_in_third_item(
    project: pytest.Pytester, run_id: str, output: int | None
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a run of FT-K-1..4 in a subprocess (stdout/stderr to ``output``) and
    return (process, results.jsonl) once FT-K-1 and FT-K-2 are recorded and FT-K-3
    is inside its 60 s sleep; the process is killed if that never happens."""
    tests = "".join(_ft(f"FT-K-{i}", "t_slow") for i in range(1, 3))
    tests += _ft("FT-K-3", "t_slow", extra="params: {sleep: 60}")
    tests += _ft("FT-K-4", "t_slow")
    write(project, "a.yaml", _contract(tests))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "contracts", *PLUGIN_ARGS, "--run-id", run_id, "-p", "no:cacheprovider"],
        cwd=project.path, env=env, stdout=output, stderr=subprocess.STDOUT,
        # SIGINT at its default in the child, as from a terminal, even where this run
        # inherited it ignored (a job started with `&` by a non-interactive shell)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    jsonl = project.path / "reports" / run_id / "results.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if jsonl.exists() and len(read_results(jsonl).results) >= 2:
                break
            assert proc.poll() is None, "the run ended before FT-K-3 started"
            time.sleep(0.05)
        else:
            raise AssertionError("two items never finished")
        time.sleep(0.3)  # inside FT-K-3's sleep now
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, jsonl


def test_killed_run_keeps_finished_items_and_the_report_marks_the_rest_unfinished(project: pytest.Pytester) -> None:
    proc, jsonl = start_run_stuck_in_third_item(project, "killed", subprocess.DEVNULL)
    proc.kill()
    proc.wait()
    data = read_results(jsonl)
    assert sorted(r["id"] for r in data.results) == ["FT-K-1", "FT-K-2"]
    assert data.interrupted and not data.corrupt_lines
    built = build_report(jsonl)
    rows = json.loads(built.paths["json"].read_text())
    assert {r["id"]: r["verdict"] for r in rows} == {
        "FT-K-1": "CORROBORATED", "FT-K-2": "CORROBORATED", "FT-K-3": "UNFINISHED", "FT-K-4": "UNFINISHED",
    }
    assert built.overall["ready"] is False and built.overall["counts"]["UNFINISHED"] == 2
    assert "did not finish" in built.paths["html"].read_text()


def test_a_partial_run_is_never_sign_off_ready(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-OK", "t_below", thresholds="{limit: 2.0}") + _ft("FT-OTHER", "t_below", thresholds="{limit: 2.0}")
    ))
    result = run(project, "--signoff", "-k", "FT-OK")
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret != 0
    overall = build_report(project.path / "reports" / "r1" / "results.jsonl").overall
    assert overall["ready"] is False and any("deselected" in p for p in overall["problems"])


def test_a_test_without_a_check_block_is_unbound(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract("- id: FT-PROSE\n  rule: r\n  prediction: p\n"))
    result = run(project)
    result.assert_outcomes(skipped=1)
    (record,) = results(project).values()
    assert record["verdict"] == "UNBOUND" and "no check block" in record["reason"]


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_duplicate_id_fails_only_those_tests_naming_both_places(project: pytest.Pytester, order: str) -> None:
    """Both tests that share an id are ERROR, each naming the other's place; every other test
    of both files runs; which file is collected first changes nothing."""
    a = write(project, "a.yaml", _contract(GOOD_FT + _ft("FT-A-ONLY", "t_below", thresholds="{limit: 2.0}")))
    b = write(project, "b.yaml", _contract(_ft("FT-B-ONLY", "t_below", thresholds="{limit: 2.0}") + GOOD_FT))
    files = ["contracts/a.yaml", "contracts/b.yaml"][:: 1 if order == "a_first" else -1]
    result = project.runpytest(*files, *PLUGIN_ARGS, "--run-id", "r1", "-rfEs")
    by_id = results(project)
    verdicts = {k: v["verdict"] for k, v in by_id.items()}
    assert verdicts == {
        "contracts/a.yaml::FT-OK": "ERROR", "contracts/a.yaml::FT-OK::control[t-bad]": "ERROR",
        "contracts/a.yaml::FT-A-ONLY": "CORROBORATED",
        "contracts/b.yaml::FT-OK": "ERROR", "contracts/b.yaml::FT-OK::control[t-bad]": "ERROR",
        "contracts/b.yaml::FT-B-ONLY": "CORROBORATED",
    }
    a_line = next(n for n, ln in enumerate(a.read_text().splitlines(), 1) if "id: FT-OK" in ln)
    b_line = next(n for n, ln in enumerate(b.read_text().splitlines(), 1) if "id: FT-OK" in ln)
    for nodeid in ("contracts/a.yaml::FT-OK", "contracts/b.yaml::FT-OK"):
        reason = by_id[nodeid]["reason"]
        assert "duplicate falsification test id 'FT-OK'" in reason
        assert f"a.yaml:{a_line}" in reason and f"b.yaml:{b_line}" in reason, reason
    assert read_results(project.path / "reports" / "r1" / "results.jsonl").collection_errors == []
    result.assert_outcomes(passed=2, failed=4)


def test_duplicate_id_in_one_file_fails_both_and_keeps_the_rest(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(GOOD_FT + _ft("FT-MID", "t_below", thresholds="{limit: 2.0}") + GOOD_FT))
    run(project)
    verdicts = {k.split("::", 1)[1]: v["verdict"] for k, v in results(project).items()}
    assert verdicts["FT-MID"] == "CORROBORATED"
    dups = {k: v for k, v in verdicts.items() if k.startswith("FT-OK")}
    assert len(dups) == 4 and set(dups.values()) == {"ERROR"}, verdicts


def test_cases_make_one_item_per_model_and_case_with_its_own_report_row(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-P", "t_below", controls="[t-bad]", thresholds="{limit: 2.0}",
            extra="models: [tiny, tiny-student]\ncases: [gemv, mma]")
    ))
    run(project)
    by_id = results(project)
    assert sorted(k.split("::", 1)[1] for k in by_id) == sorted(
        f"FT-P[{m}@{c}]" + ctl for m in ("tiny", "tiny-student") for c in ("gemv", "mma") for ctl in ("", "::control[t-bad]")
    )
    rec = by_id["contracts/a.yaml::FT-P[tiny-student@mma]"]
    assert (rec["model"], rec["case"], rec["verdict"]) == ("tiny-student", "mma", "CORROBORATED")
    from harness.report import _rows

    data = read_results(project.path / "reports" / "r1" / "results.jsonl")
    rows = _rows(data, data.results)
    assert sorted(r["model"] for r in rows) == ["tiny-student@gemv", "tiny-student@mma", "tiny@gemv", "tiny@mma"]
    assert all(r["prediction"] and len(r["controls"]) == 1 for r in rows)
