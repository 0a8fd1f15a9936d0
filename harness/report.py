"""Build report.html, results.json and junit.xml from a results.jsonl alone.

Items listed in the run's header but absent from the file are UNFINISHED (the
run was killed or interrupted); corrupt lines are listed, never fatal. The HTML
is one self-contained file (inline CSS, no external URL) rendered with jinja2
autoescaping on, so contract text can never inject markup.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from harness.results import RunData, read_results
from harness.verdict import Verdict, item_passes

UNFINISHED = "UNFINISHED"
VERDICT_ORDER = [str(v) for v in Verdict] + [UNFINISHED]


@dataclass
class Built:
    paths: dict[str, Path]
    overall: dict[str, Any]


def _passes(record: dict[str, Any]) -> bool | None:
    """True pass, False fail, None did not run: the sign-off rule of harness.verdict.item_passes."""
    verdict = record.get("verdict")
    if verdict not in {str(v) for v in Verdict}:  # UNFINISHED, or a value this version does not know
        return False
    return item_passes(Verdict(verdict), record.get("control"))


def _label(record: dict[str, Any]) -> str:
    base = record.get("id", "?") + (f"[{record['model']}]" if record.get("model") else "")
    return base + (f" control {record['control']}" if record.get("control") else "")


def _unfinished_records(run: RunData) -> list[dict[str, Any]]:
    info = {e["nodeid"]: e for h in run.headers for e in h.get("expected_items", []) if "nodeid" in e}
    out = []
    for nodeid in run.unfinished:
        e = info.get(nodeid, {"id": nodeid.split("::")[1] if "::" in nodeid else nodeid})
        out.append({
            "type": "result", "nodeid": nodeid, "id": e.get("id"), "model": e.get("model"),
            "control": e.get("control"), "contract": e.get("contract"), "verdict": UNFINISHED,
            "passed": False, "reason": "the run ended before this item finished (interrupted or killed)",
            "measurements": {}, "comparisons": [], "series": [], "logs": [], "notes": [], "traceback": "",
            "duration_s": None,
        })
    return out


def overall_verdict(run: RunData, records: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(str(r.get("verdict")) for r in records)
    # one line per distinct (verdict, reason): 20 items NOT RUN for want of CUDA read as one fact
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in records:
        if _passes(r) is not True:
            grouped.setdefault((str(r.get("verdict")), str(r.get("reason", ""))), []).append(_label(r))
    problems = [
        f"{labels[0]}: {verdict}: {reason}" if len(labels) == 1
        else f"{len(labels)} items {verdict}: {reason} ({', '.join(labels)})"
        for (verdict, reason), labels in grouped.items()
    ]
    problems += [f"collection error: {e.get('text') or e.get('message')}" for e in run.collection_errors]
    problems += [f"results.jsonl line {c['line']} is corrupt: {c['error']}" for c in run.corrupt_lines]
    if run.deselected:
        problems.append(
            f"{len(run.deselected)} contract item(s) were deselected (-k/-m): a partial run is not a sign-off"
        )
    if not records:
        problems.append("no contract item ran")
    ready = not problems
    return {
        "ready": ready,
        "label": "SIGN-OFF READY" if ready else "NOT READY",
        "counts": {v: counts.get(v, 0) for v in VERDICT_ORDER},
        "total": len(records),
        "predictions": sum(1 for r in records if not r.get("control")),
        "controls": sum(1 for r in records if r.get("control")),
        "collection_errors": len(run.collection_errors),
        "corrupt_lines": len(run.corrupt_lines),
        "interrupted": run.interrupted,
        "problems": problems,
    }


def _rows(run: RunData, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (contract, FT, model): the prediction record and its control records.

    Rows follow each contract's own order; a test with no record at all (its
    contract was loaded but none of its items ran) still gets a row.
    """
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        by_model = groups.setdefault((str(r.get("contract") or ""), str(r.get("id"))), {})
        row = by_model.setdefault(str(r.get("model") or ""), {"model": r.get("model"), "prediction": None, "controls": []})
        if r.get("control"):
            row["controls"].append(r)
        else:
            row["prediction"] = r
    rows: list[dict[str, Any]] = []
    for c in run.contracts:
        for t in c.get("tests", []):
            found = groups.pop((c["path"], t["id"]), None) or {"": {"model": None, "prediction": None, "controls": []}}
            rows += [{"contract": c["path"], "test": t, **row} for row in found.values()]
    for (path, ft_id), found in groups.items():  # results whose contract summary is missing
        first = next(iter(found.values()))
        r = first["prediction"] or first["controls"][0]
        test = {"id": ft_id, "rule": r.get("rule", ""), "prediction": r.get("prediction", ""),
                "if_fails": r.get("if_fails", ""), "thresholds": r.get("thresholds", {})}
        rows += [{"contract": path, "test": test, **row} for row in found.values()]
    return rows


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,  # every contract and log string is data, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_html(run: RunData, records: list[dict[str, Any]], overall: dict[str, Any]) -> str:
    header = run.headers[0] if run.headers else {}
    env = _env()
    env.filters["fmt"] = _fmt
    by_contract: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(run, records):
        by_contract.setdefault(row["contract"], []).append(row)
    return env.get_template("report.html").render(
        run_id=run.run_id,
        header=header,
        environment=header.get("environment", {}),
        overall=overall,
        contracts={c["path"]: c for c in run.contracts},
        by_contract=by_contract,
        collection_errors=run.collection_errors,
        corrupt_lines=run.corrupt_lines,
        binding_errors={k: v for h in run.headers for k, v in h.get("binding_errors", {}).items()},
        passes=_passes,
    )


def junit_xml(records: list[dict[str, Any]], run: RunData, overall: dict[str, Any]) -> bytes:
    suite = ET.Element("testsuite", {
        "name": f"q4k-contracts-{run.run_id}", "tests": str(len(records) + len(run.collection_errors)),
        "failures": str(sum(1 for r in records if _passes(r) is False and r.get("verdict") == str(Verdict.FALSIFIED))
                        + sum(1 for r in records if r.get("control") and r.get("verdict") == str(Verdict.CORROBORATED))),
        "errors": str(sum(1 for r in records if r.get("verdict") in (str(Verdict.ERROR), UNFINISHED)) + len(run.collection_errors)),
        "skipped": str(sum(1 for r in records if _passes(r) is None)),
        "time": f"{sum(float(r.get('duration_s') or 0) for r in records):.3f}",
    })
    for r in records:
        case = ET.SubElement(suite, "testcase", {
            "classname": str(r.get("contract") or ""), "name": _label(r),
            "time": f"{float(r.get('duration_s') or 0):.3f}",
        })
        verdict, reason = str(r.get("verdict")), str(r.get("reason", ""))
        ok = _passes(r)
        if ok is None:
            ET.SubElement(case, "skipped", {"message": f"{verdict}: {reason}"})
        elif ok is False:
            tag = "error" if verdict in (str(Verdict.ERROR), UNFINISHED) else "failure"
            el = ET.SubElement(case, tag, {"message": f"{verdict}: {reason}", "type": verdict})
            el.text = str(r.get("traceback") or reason)
    for e in run.collection_errors:
        case = ET.SubElement(suite, "testcase", {"classname": str(e.get("file")), "name": "collection"})
        ET.SubElement(case, "error", {"message": str(e.get("text") or e.get("message")), "type": "ContractError"})
    ET.SubElement(suite, "properties")
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def _write(path: Path, data: str | bytes) -> None:
    """Write then rename, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def build_report(results_jsonl: str | Path, out_dir: str | Path | None = None) -> Built:
    run = read_results(results_jsonl)
    out = Path(out_dir) if out_dir is not None else Path(results_jsonl).parent
    out.mkdir(parents=True, exist_ok=True)
    records = run.results + _unfinished_records(run)
    overall = overall_verdict(run, records)
    paths = {"html": out / "report.html", "json": out / "results.json", "junit": out / "junit.xml"}
    slim = [
        {k: r.get(k) for k in ("id", "control", "model", "verdict", "reason", "measurements", "comparisons",
                               "nodeid", "contract", "duration_s", "passed", "worker", "gpu")}
        for r in records
    ]
    _write(paths["json"], json.dumps(slim, indent=2, default=str))
    _write(paths["junit"], junit_xml(records, run, overall))
    _write(paths["html"], render_html(run, records, overall))
    return Built(paths, overall)
