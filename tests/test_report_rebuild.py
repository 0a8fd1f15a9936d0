"""harness.report and `q4k report`: rebuilt from results.jsonl alone; unfinished and corrupt lines."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.cli import main as q4k
from harness.report import build_report
from harness.results import append_line, read_results


def _header(expected: list[tuple[str, str | None]]) -> dict:
    items = [{"nodeid": f"c.yaml::{i}" + (f"::control[{c}]" if c else ""), "id": i, "model": None,
              "control": c, "contract": "c.yaml"} for i, c in expected]
    return {
        "type": "header", "run_id": "run-x", "started_at": "2026-01-01T00:00:00+00:00",
        "environment": {"python": "3.11", "torch": "2.13.0"},
        "expected": [e["nodeid"] for e in items], "expected_items": items,
        "contracts": [{"path": "c.yaml", "title": "Demo <contract>", "version": "1", "description": "",
                       "tests": [{"id": "FT-1", "rule": "r1", "prediction": "p1", "if_fails": "f1", "thresholds": {"x_max": 1.0}},
                                 {"id": "FT-2", "rule": "r2", "prediction": "p2", "if_fails": "f2", "thresholds": {}}],
                       "not_applicable": {"equations": ["EQ-1: y = x"]}, "unknown_keys": []}],
    }


def _result(ft: str, verdict: str, control: str | None = None, value: float = 0.5) -> dict:
    return {"type": "result", "nodeid": f"c.yaml::{ft}" + (f"::control[{control}]" if control else ""),
            "id": ft, "control": control, "model": None, "contract": "c.yaml", "verdict": verdict,
            "reason": f"{verdict} because", "measurements": {"x": {"value": value, "unit": "GB"}},
            "comparisons": [{"name": "x", "value": value, "op": "<=", "limit": 1.0, "unit": "GB", "passed": value <= 1.0, "detail": ""}],
            "duration_s": 0.25, "logs": [], "notes": [], "series": [], "traceback": ""}


def test_missing_items_are_unfinished_and_corrupt_lines_are_reported(tmp_path: Path) -> None:
    jsonl = tmp_path / "run-x" / "results.jsonl"
    append_line(jsonl, _header([("FT-1", None), ("FT-1", "bad"), ("FT-2", None)]))
    append_line(jsonl, _result("FT-1", "CORROBORATED"))
    with jsonl.open("a") as fh:
        fh.write('{"type": "result", "id": "FT-2", "verd\n')  # a torn line
        fh.write("[1, 2]\n")
    data = read_results(jsonl)
    assert [c["line"] for c in data.corrupt_lines] == [3, 4]
    built = build_report(jsonl, tmp_path / "out")
    rows = {(r["id"], r["control"]): r["verdict"] for r in json.loads(built.paths["json"].read_text())}
    assert rows == {("FT-1", None): "CORROBORATED", ("FT-1", "bad"): "UNFINISHED", ("FT-2", None): "UNFINISHED"}
    overall = built.overall
    assert overall["ready"] is False and overall["interrupted"] is True
    assert overall["counts"]["UNFINISHED"] == 2 and overall["corrupt_lines"] == 2
    html = built.paths["html"].read_text()
    assert "NOT READY" in html and "Corrupt lines in results.jsonl" in html
    assert "Demo &lt;contract&gt;" in html  # the title is escaped too
    suite = ET.parse(built.paths["junit"]).getroot()
    assert suite.get("tests") == "3" and suite.get("errors") == "2"


def test_ready_only_when_every_prediction_corroborated_and_every_control_falsified(tmp_path: Path) -> None:
    jsonl = tmp_path / "r" / "results.jsonl"
    append_line(jsonl, _header([("FT-1", None), ("FT-1", "bad")]))
    append_line(jsonl, _result("FT-1", "CORROBORATED"))
    append_line(jsonl, _result("FT-1", "FALSIFIED", control="bad", value=3.0))
    append_line(jsonl, {"type": "footer", "exitstatus": 0})
    assert build_report(jsonl).overall["ready"] is True
    # the same control CORROBORATED: the falsifier is blind, so the run is not ready
    append_line(jsonl, _result("FT-1", "CORROBORATED", control="bad"))  # a later record of an item wins
    overall = build_report(jsonl).overall
    assert overall["ready"] is False
    assert any("control bad" in p for p in overall["problems"])


def _row(html: str, anchor: str) -> str:
    """One top-level table row: rows start on a line of their own, nested evidence tables do not."""
    return html.split(f'id="{anchor}"', 1)[1].split("\n<tr", 1)[0]


def test_measured_value_and_threshold_are_shown(tmp_path: Path) -> None:
    jsonl = tmp_path / "r" / "results.jsonl"
    append_line(jsonl, _header([("FT-1", None)]))
    append_line(jsonl, _result("FT-1", "FALSIFIED", value=4.25))
    html = build_report(jsonl).paths["html"].read_text()
    row = _row(html, "FT-1")
    assert "4.25" in row and "&lt;=" in row and "1" in row and "FALSIFIED" in row
    head = _row(html, "test-FT-1")  # the test's own row, printed once above its model rows
    assert "p1" in head and "f1" in head  # prediction and if_fails text


def test_report_is_self_contained(tmp_path: Path) -> None:
    jsonl = tmp_path / "r" / "results.jsonl"
    append_line(jsonl, _header([("FT-1", None)]))
    html = build_report(jsonl).paths["html"].read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html and "src=" not in html
    assert "<style>" in html


def test_q4k_report_rebuilds_into_another_directory(tmp_path: Path, capsys) -> None:
    jsonl = tmp_path / "r" / "results.jsonl"
    append_line(jsonl, _header([("FT-1", None)]))
    append_line(jsonl, _result("FT-1", "CORROBORATED"))
    assert q4k(["report", str(jsonl), "-o", str(tmp_path / "rebuilt")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SIGN-OFF READY: 1/1 predictions CORROBORATED\n")  # every expected item finished and held
    assert (tmp_path / "rebuilt" / "report.html").exists() and (tmp_path / "rebuilt" / "junit.xml").exists()
    assert q4k(["report", str(tmp_path / "nope.jsonl")]) == 2


def test_rows_keep_prediction_and_controls_together_in_contract_order(tmp_path: Path) -> None:
    jsonl = tmp_path / "r" / "results.jsonl"
    append_line(jsonl, _header([("FT-1", None), ("FT-1", "bad"), ("FT-2", None)]))
    append_line(jsonl, _result("FT-2", "CORROBORATED"))
    append_line(jsonl, _result("FT-1", "CORROBORATED"))
    append_line(jsonl, _result("FT-1", "FALSIFIED", control="bad", value=3.0))
    html = build_report(jsonl).paths["html"].read_text()
    assert html.index('id="FT-1"') < html.index('id="FT-2"')
    row = _row(html, "FT-1")
    assert row.count(">CORROBORATED</span>") == 1 and "FALSIFIED</span> bad" in row and "UNFINISHED" not in row
