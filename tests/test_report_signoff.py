"""The report reads as a sign-off: predictions and controls counted apart, each control's
evidence shown, NOT RUN grouped by reason, when/where/how long in the header, the rule once
per test with each model row's own values, timing noise left out of the comparison."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness.cli import main as q4k
from harness.report import TIMING_FLOOR_S, build_report, compare_runs, headline
from harness.results import append_line

FIXTURE = Path(__file__).resolve().parent / "data" / "h100-trimmed-results.jsonl"
H100_RUN = Path(__file__).resolve().parents[1] / "docs" / "h100-signoff-results.jsonl"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    for r in records:
        append_line(path, r)
    return path


def _row(html: str, anchor: str) -> str:
    return html.split(f'id="{anchor}"', 1)[1].split("\n<tr", 1)[0]


def test_banner_counts_predictions_and_controls_apart_on_a_real_signoff_run(tmp_path: Path) -> None:
    records = [r for r in _lines(H100_RUN) if r.get("type") == "result"]
    preds = [r for r in records if not r.get("control")]
    ctls = [r for r in records if r.get("control")]
    assert all(r["verdict"] == "CORROBORATED" for r in preds) and all(r["verdict"] == "FALSIFIED" for r in ctls)
    built = build_report(H100_RUN, tmp_path, previous=None)
    assert built.overall["ready"] is True
    banner = built.paths["html"].read_text().split('<div class="headline">', 1)[1].split("</div>", 1)[0]
    assert f"{len(preds)}/{len(preds)} predictions CORROBORATED" in banner
    assert f"{len(ctls)}/{len(ctls)} controls FALSIFIED" in banner
    assert not re.search(r"<span>\d+ FALSIFIED</span>", banner)  # no bare count that reads like failures


def test_headline_names_what_is_not_the_wanted_outcome() -> None:
    recs = [{"verdict": "CORROBORATED"}, {"verdict": "NOT RUN"}, {"verdict": "FALSIFIED"},
            {"verdict": "FALSIFIED", "control": "c1"}, {"verdict": "CORROBORATED", "control": "c2"}]
    assert headline(recs) == ["1/3 predictions CORROBORATED (1 FALSIFIED, 1 NOT RUN)",
                              "1/2 controls FALSIFIED (1 CORROBORATED)"]


def test_each_falsified_control_shows_its_failed_comparisons_and_values(tmp_path: Path) -> None:
    html = build_report(FIXTURE, tmp_path, previous=None).paths["html"].read_text()
    controls = [r for r in _lines(FIXTURE) if r.get("type") == "result" and r.get("control")
                and r["verdict"] == "FALSIFIED" and r.get("model")]
    assert controls
    for ctl in controls:
        row = _row(html, f"{ctl['id']}-{ctl['model']}")
        cell = row.split(f"</span> {ctl['control']}", 1)[1].split('<div class="control">', 1)[0]
        failed = [c for c in ctl["comparisons"] if not c["passed"]]
        assert failed, ctl["id"]
        for c in failed:
            assert f'<li class="bad">✘ {c["name"]}' in cell, (ctl["id"], c["name"])
            if not isinstance(c["value"], bool):  # a number: its value is printed beside the limit
                assert f"{c['value']:.6g}" in cell, (ctl["id"], c["name"])
        assert "<summary>evidence</summary>" in cell  # the control's measurements, folded


def test_not_run_items_are_grouped_by_reason(tmp_path: Path) -> None:
    records = _lines(FIXTURE)
    results = [r for r in records if r.get("type") == "result"]
    for r in results:
        r.update(verdict="NOT RUN", reason="cuda: no CUDA device (torch.cuda.is_available() is False)")
    results[0]["reason"] = "model:gemma3-270m: package not installed"
    html = build_report(_write(tmp_path / "r" / "results.jsonl", records), previous=None).paths["html"].read_text()
    problems = html.split('id="problems"', 1)[1].split("</ul>", 1)[0]
    assert problems.count("<li>") == 2
    assert f"{len(results) - 1} items NOT RUN</strong>: cuda: no CUDA device" in problems
    assert "<summary class=\"small\">which items</summary>" in problems  # the ids folded, not a wall


def test_header_shows_finish_time_duration_host_and_gpu(tmp_path: Path) -> None:
    records = _lines(FIXTURE)
    records[0]["started_at"] = "2026-11-25T12:00:00+00:00"
    records[0]["environment"].update(hostname="runner-7", gpu="NVIDIA H100 80GB HBM3 x1")
    for r in records:
        if r.get("type") == "footer":
            r["finished_at"] = "2026-11-25T12:06:45+00:00"
    html = build_report(_write(tmp_path / "r" / "results.jsonl", records), previous=None).paths["html"].read_text()
    facts = html.split('class="small runfacts"', 1)[1].split("</p>", 1)[0]
    for text in ("finished <strong>2026-11-25T12:06:45+00:00", "duration <strong>6 min 45 s",
                 "host <strong>runner-7", "GPU <strong>NVIDIA H100 80GB HBM3 x1"):
        assert text in facts, text


def test_rule_is_printed_once_per_test_and_rows_show_their_own_models_values(tmp_path: Path) -> None:
    records = _lines(H100_RUN)
    html = build_report(_write(tmp_path / "r" / "results.jsonl", records), previous=None).paths["html"].read_text()
    rule = next(t["rule"] for c in records[0]["contracts"] for t in c["tests"] if t["id"] == "FT-VOCAB-ALIGN-001")
    assert "152064" in rule and html.count(rule) == 1
    by_model = {r["model"]: r for r in records
                if r.get("type") == "result" and r["id"] == "FT-VOCAB-ALIGN-001" and not r.get("control")}
    assert set(by_model) == {"tiny", "qwen2.5-7b-shape"}
    for model, rec in by_model.items():
        facts = _row(html, f"FT-VOCAB-ALIGN-001-{model}").split('class="small facts">', 1)[1].split("</div>", 1)[0]
        student = rec["measurements"]["student_vocab"]["value"]
        assert f"student_vocab {student}" in facts
    assert "student_vocab 1920" in _row(html, "FT-VOCAB-ALIGN-001-tiny")
    assert "152064" not in _row(html, "FT-VOCAB-ALIGN-001-tiny")


def test_moved_comparison_ignores_timings_under_the_floor() -> None:
    def rec(**m: tuple[float, str]) -> dict[str, Any]:
        return {"nodeid": "a", "id": "a", "verdict": "CORROBORATED",
                "measurements": {k: {"value": v, "unit": u} for k, (v, u) in m.items()}}

    small = TIMING_FLOOR_S / 10
    cmp = compare_runs([rec(fast=(small * 3, "s"), slow=(TIMING_FLOOR_S * 3, "s"), gb=(small * 3, "GB"))],
                       [rec(fast=(small, "s"), slow=(TIMING_FLOOR_S, "s"), gb=(small, "GB"))])
    assert sorted(m["name"] for m in cmp["moved"]) == ["gb", "slow"]  # a tiny size change still counts


def test_q4k_report_refuses_a_file_that_is_not_a_results_jsonl(tmp_path: Path, capsys: Any) -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert q4k(["report", str(readme), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a results.jsonl" in err and not (tmp_path / "out").exists()
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"a": 1}\n[1, 2]\n')
    assert q4k(["report", str(listing)]) == 2
    # a killed run whose header line was lost is still a results file
    lines = [ln for ln in FIXTURE.read_text().splitlines() if json.loads(ln).get("type") == "result"]
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert q4k(["report", str(tmp_path / "k" / "results.jsonl")]) == 0


def test_items_not_applicable_here_do_not_block_signoff_but_missing_requirements_do(tmp_path: Path) -> None:
    """NOT RUN because the tested thing does not exist here (a kernel path this GPU never
    takes: ``applicable`` false) is shown and counted apart, and the run stays READY;
    the same item NOT RUN for a missing requirement blocks it."""
    records = [r for r in _lines(H100_RUN) if r.get("type") in ("header", "result", "footer")]
    results = [r for r in records if r.get("type") == "result"]
    item = next(r for r in results if not r.get("control"))
    item.update(verdict="NOT RUN", reason="no linear of this file dispatches to wgmma on this GPU",
                applicable=False)
    built = build_report(_write(tmp_path / "a" / "results.jsonl", records), previous=None)
    assert built.overall["ready"] is True
    preds = sum(1 for r in results if not r.get("control"))
    assert built.overall["headline"][0] == (
        f"{preds - 1}/{preds} predictions CORROBORATED (1 NOT RUN, not applicable here)")
    item["applicable"] = True  # a requirement was missing instead
    built = build_report(_write(tmp_path / "b" / "results.jsonl", records), previous=None)
    assert built.overall["ready"] is False


def test_headline_keeps_plain_not_run_apart_from_not_applicable() -> None:
    recs = [{"verdict": "CORROBORATED"}, {"verdict": "NOT RUN"}, {"verdict": "NOT RUN", "applicable": False}]
    assert headline(recs) == ["1/3 predictions CORROBORATED (1 NOT RUN, 1 NOT RUN, not applicable here)"]
