"""harness.contract: safe loading, validation, errors naming file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness import registry
from harness.context import Context
from harness.contract import ContractError, load_contract

ROOT = Path(__file__).resolve().parents[1]


@registry.falsifier("_unit_limit_check", thresholds={"limit": float, "count": int})
def _unit_limit_check(ctx: Context) -> None:
    ctx.check("x", 1.0, "<=", ctx.threshold("limit"))


@registry.subject("_unit_good")
def _unit_good(ctx: Context) -> object:
    return object()


@registry.subject("_unit_bad")
def _unit_bad(ctx: Context) -> object:
    return object()


registry.plan(falsifiers=("_unit_planned_falsifier",), subjects=("_unit_planned_subject",))

GOOD = """\
metadata:
  name: demo
  version: "1"
equations:
  - id: EQ-1
    formula: "y = x"
proof_obligations:
  - id: PO-1
    property: nothing
kani_harnesses: []
qa_gate:
  id: QA-1
extra_section: {tolerated: true}
falsification_tests:
  - id: FT-UNIT-001
    rule: a rule
    prediction: a prediction
    if_fails: it fails
    check:
      falsifier: _unit_limit_check
      subject: _unit_good
      controls: [_unit_bad]
      thresholds: {limit: 2, count: 3}
      params: {n: 1}
      surprise: 1
  - id: FT-UNIT-002
    rule: planned
    prediction: later
    check:
      falsifier: _unit_planned_falsifier
      subject: _unit_planned_subject
      controls: [_unit_planned_subject]
"""


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing needle (the expectation comes from the file)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def test_valid_contract_loads_with_bound_and_planned_items(tmp_path: Path) -> None:
    contract = load_contract(_write(tmp_path, GOOD))
    first, second = contract.tests
    assert first.id == "FT-UNIT-001" and first.check is not None
    assert first.check.bound and first.check.controls == ("_unit_bad",)
    assert first.check.thresholds == {"limit": 2, "count": 3}
    assert second.check is not None and not second.check.bound  # planned: UNBOUND, not an error


def test_non_executable_parts_and_unknown_keys_are_listed(tmp_path: Path) -> None:
    contract = load_contract(_write(tmp_path, GOOD))
    assert set(contract.not_applicable) == {"equations", "proof_obligations", "kani_harnesses", "qa_gate"}
    assert any("EQ-1" in entry for entry in contract.not_applicable["equations"])
    assert any(k.startswith("extra_section") for k in contract.unknown_keys)
    assert any(k.startswith("FT-UNIT-001.check.surprise") for k in contract.unknown_keys)


def _bad(tmp_path: Path, old: str, new: str) -> Path:
    assert old in GOOD
    return _write(tmp_path, GOOD.replace(old, new, 1))


# (what to break, replacement, field named in the error, text on the offending line)
BAD_CASES = {
    "yaml-syntax": ("    rule: a rule\n", "    rule: [unclosed\n", "<yaml>", None),
    "missing-id": ("  - id: FT-UNIT-001\n    rule: a rule", "  - rule: a rule", "falsification_tests[0].id", "- rule: a rule"),
    "missing-rule": ("    rule: a rule\n", "", "FT-UNIT-001.rule", "- id: FT-UNIT-001"),
    "missing-prediction": ("    prediction: a prediction\n", "", "FT-UNIT-001.prediction", "- id: FT-UNIT-001"),
    "empty-prediction": ("prediction: a prediction", "prediction: ''", "FT-UNIT-001.prediction", "prediction: ''"),
    "unknown-falsifier": ("falsifier: _unit_limit_check", "falsifier: _unit_limit_chek", "FT-UNIT-001.check.falsifier", "_unit_limit_chek"),
    "threshold-type": ("{limit: 2, count: 3}", "{limit: '2 GB', count: 3}", "FT-UNIT-001.check.thresholds.limit", "'2 GB'"),
    "threshold-int-for-float-ok-but-float-for-int": ("count: 3}", "count: 3.5}", "FT-UNIT-001.check.thresholds.count", "count: 3.5"),
    "unknown-control": ("controls: [_unit_bad]", "controls: [_unit_badd]", "FT-UNIT-001.check.controls[0]", "_unit_badd"),
    "unknown-subject": ("subject: _unit_good", "subject: _unit_goood", "FT-UNIT-001.check.subject", "_unit_goood"),
    "undeclared-threshold": ("{limit: 2, count: 3}", "{limit: 2, count: 3, limt: 1}", "FT-UNIT-001.check.thresholds.limt", "limt: 1"),
    "missing-metadata": ("metadata:\n  name: demo\n  version: \"1\"\n", "", "metadata", None),
    "duplicate-key": ("    if_fails: it fails\n", "    if_fails: it fails\n    if_fails: twice\n", "if_fails", "if_fails: twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_contract_error_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    old, new, field_name, line_text = BAD_CASES[case]
    path = _bad(tmp_path, old, new)
    with pytest.raises(ContractError) as info:
        load_contract(path)
    err = info.value
    assert err.path == str(path)
    assert err.field == field_name
    assert err.line is not None and err.line >= 1
    if line_text is not None:
        assert err.line == _line_of(path, line_text)
    message = str(err)
    assert str(path) in message and f":{err.line}" in message and field_name in message


def test_yaml_syntax_error_line_is_where_the_parser_stopped(tmp_path: Path) -> None:
    path = _bad(tmp_path, "    rule: a rule\n", "    rule: [unclosed\n")
    with pytest.raises(ContractError) as info:
        load_contract(path)
    # the parser notices the unclosed flow sequence at or after the line that opened it
    assert info.value.line is not None and info.value.line >= _line_of(path, "[unclosed")


def test_duplicate_id_in_one_file_marks_the_second_test(tmp_path: Path) -> None:
    path = _bad(tmp_path, "  - id: FT-UNIT-002", "  - id: FT-UNIT-001")
    tests = load_contract(path).tests
    assert [t.duplicate_of for t in tests] == [None, f"{path}:{tests[0].line}"]


def test_duplicate_id_across_files_marks_the_test_not_the_file(tmp_path: Path) -> None:
    seen: dict[str, str] = {}
    first = _write(tmp_path, GOOD, "a.yaml")
    load_contract(first, seen)
    second = _write(tmp_path, GOOD.replace("FT-UNIT-002", "FT-UNIT-003"), "b.yaml")
    contract = load_contract(second, seen)  # the file loads: only its duplicate test is marked
    by_id = {t.id: t for t in contract.tests}
    assert by_id["FT-UNIT-003"].duplicate_of is None
    dup = by_id["FT-UNIT-001"].duplicate_of
    assert dup is not None and dup.startswith(f"{first}:")


ALIAS_BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_alias_bomb_in_a_non_executed_section_is_refused_at_its_line(tmp_path: Path) -> None:
    import time

    text = GOOD.replace("kani_harnesses: []\n", "kani_harnesses:\n" + textwrap.indent(ALIAS_BOMB, "  "))
    path = _write(tmp_path, text, "bomb.yaml")
    t0 = time.perf_counter()
    with pytest.raises(ContractError) as info:
        load_contract(path)
    assert time.perf_counter() - t0 < 2.0
    assert info.value.field == "<yaml>" and "alias '*a'" in info.value.message
    assert info.value.line == _line_of(path, "b: &b")


def test_oversized_contract_is_refused_before_parsing(tmp_path: Path) -> None:
    from harness.contract import MAX_CONTRACT_BYTES

    path = _write(tmp_path, GOOD + "#" * MAX_CONTRACT_BYTES + "\n", "big.yaml")
    with pytest.raises(ContractError) as info:
        load_contract(path)
    assert info.value.field == "<file>" and str(MAX_CONTRACT_BYTES) in info.value.message


def test_summary_lists_a_few_ids_then_the_count() -> None:
    from harness.report import LISTED, some_of

    labels = [f"FT-{i}" for i in range(300)]
    text = some_of(labels)
    assert text.startswith("FT-0, FT-1") and text.endswith(f"... and {300 - LISTED} more")
    assert f"FT-{LISTED}," not in text and some_of(labels[:3]) == "FT-0, FT-1, FT-2"


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = _bad(tmp_path, "rule: a rule", "rule: !!python/object/apply:os.system ['true']")
    with pytest.raises(ContractError) as info:
        load_contract(path)
    assert info.value.field == "<yaml>"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "contracts").glob("*.yaml")))
def test_project_contracts_validate(name: str) -> None:
    contract = load_contract(ROOT / "contracts" / name)
    assert contract.tests and all(t.check is not None for t in contract.tests)
    assert "equations" in contract.not_applicable


def test_project_contracts_use_the_architecture_names() -> None:
    """Every FT of docs/ARCHITECTURE.md's table, with exactly its falsifier/subject/controls."""
    table: dict[str, tuple[str, str, str]] = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        if not line.lstrip().startswith("|"):  # table rows only, not prose that names an FT
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("FT-"):
            table[cells[0]] = (cells[1], cells[2], cells[3])
    seen: dict[str, str] = {}
    found = {}
    for path in sorted((ROOT / "contracts").glob("*.yaml")):
        for t in load_contract(path, seen).tests:
            assert t.check is not None
            found[t.id] = (t.check.falsifier, t.check.subject, ", ".join(t.check.controls))
    assert found == table
