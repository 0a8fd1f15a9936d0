"""Build report.html, results.json and junit.xml from a results.jsonl alone.

Items listed in the run's header but absent from the file are UNFINISHED (the
run was killed or interrupted); corrupt lines are listed, never fatal. The HTML
is one self-contained file (inline CSS, no external URL) rendered with jinja2
autoescaping on, so contract text can never inject markup.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from harness import charts
from harness.results import RunData, read_results
from harness.verdict import Verdict, applicable, item_passes

UNFINISHED = "UNFINISHED"
VERDICT_ORDER = [str(v) for v in Verdict] + [UNFINISHED]
MOVED_FRACTION = 0.10  # a measured value that moved by more than this against the previous run is listed
# Timings below this many seconds are left out of that comparison: a 0.02 s item that
# took 0.03 s moved 50% by scheduler noise, and listing it hides the moves that matter.
TIMING_FLOOR_S = 1.0


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


def shown_model(record: dict[str, Any]) -> str | None:
    """The model column: the model, with the item's case (``tiny@gemv1_tc``) where it has one."""
    label = "@".join(str(p) for p in (record.get("model"), record.get("case")) if p)
    return label or None


def _label(record: dict[str, Any]) -> str:
    base = record.get("id", "?") + (f"[{shown_model(record)}]" if shown_model(record) else "")
    return base + (f" control {record['control']}" if record.get("control") else "")


def _unfinished_records(run: RunData) -> list[dict[str, Any]]:
    info = {e["nodeid"]: e for h in run.headers for e in h.get("expected_items", []) if "nodeid" in e}
    out = []
    for nodeid in run.unfinished:
        e = info.get(nodeid, {"id": nodeid.split("::")[1] if "::" in nodeid else nodeid})
        out.append({
            "type": "result", "nodeid": nodeid, "id": e.get("id"), "model": e.get("model"), "case": e.get("case"),
            "control": e.get("control"), "contract": e.get("contract"), "verdict": UNFINISHED,
            "passed": False, "reason": "the run ended before this item finished (interrupted or killed)",
            "measurements": {}, "comparisons": [], "series": [], "logs": [], "notes": [], "traceback": "",
            "duration_s": None,
        })
    return out


LISTED = 10  # item labels a summary line names before "... and N more"


def some_of(labels: list[str], shown: int = LISTED) -> str:
    """``a, b, c ... and N more``: a summary line stays one line for hundreds of items."""
    head = ", ".join(labels[:shown])
    return head + (f" ... and {len(labels) - shown} more" if len(labels) > shown else "")


def _kind_counts(records: list[dict[str, Any]], control: bool) -> dict[str, int]:
    counts = Counter(str(r.get("verdict")) for r in records if bool(r.get("control")) is control)
    return {v: counts[v] for v in VERDICT_ORDER if counts.get(v)}


def headline(records: list[dict[str, Any]]) -> list[str]:
    """The banner's count lines, predictions and controls apart: a FALSIFIED control is the
    wanted outcome, so one "8 FALSIFIED" for both kinds reads like 8 failures."""
    lines = []
    for control, noun, wanted in ((False, "predictions", str(Verdict.CORROBORATED)),
                                  (True, "controls", str(Verdict.FALSIFIED))):
        counts = _kind_counts(records, control)
        total = sum(counts.values())
        if not total:
            continue
        moot = sum(1 for r in records if bool(r.get("control")) is control and not applicable(r))
        rest = []
        for v, n in counts.items():
            if v == str(Verdict.NOT_RUN) and moot:  # apart: these do not block sign-off
                rest += [f"{n - moot} {v}"] if n > moot else []
                rest.append(f"{moot} {v}, not applicable here")
            elif v != wanted:
                rest.append(f"{n} {v}")
        lines.append(f"{counts.get(wanted, 0)}/{total} {noun} {wanted}" + (f" ({', '.join(rest)})" if rest else ""))
    return lines


def problem_groups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items that stand in the way of sign-off, one group per (verdict, reason), largest first:
    twenty items NOT RUN for want of CUDA are one fact with twenty ids, not twenty facts."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in records:
        # an item whose subject does not exist here (a kernel path this GPU never takes)
        # is shown NOT RUN but is no obstacle
        if _passes(r) is not True and applicable(r):
            grouped.setdefault((str(r.get("verdict")), str(r.get("reason", ""))), []).append(_label(r))
    groups = [{"verdict": v, "reason": reason, "labels": labels} for (v, reason), labels in grouped.items()]
    # failures before items that did not run, then the biggest group first
    groups.sort(key=lambda g: (g["verdict"] in (str(Verdict.NOT_RUN), str(Verdict.UNBOUND)), -len(g["labels"])))
    return groups


def _problem_text(group: dict[str, Any]) -> str:
    labels = group["labels"]
    if len(labels) == 1:
        return f"{labels[0]}: {group['verdict']}: {group['reason']}"
    return f"{len(labels)} items {group['verdict']}: {group['reason']} ({some_of(labels)})"


def overall_verdict(run: RunData, records: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(str(r.get("verdict")) for r in records)
    groups = problem_groups(records)
    problems = [_problem_text(g) for g in groups]
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
        "headline": headline(records),
        "total": len(records),
        "predictions": sum(1 for r in records if not r.get("control")),
        "controls": sum(1 for r in records if r.get("control")),
        "collection_errors": len(run.collection_errors),
        "corrupt_lines": len(run.corrupt_lines),
        "interrupted": run.interrupted,
        "interrupted_reason": run.interrupted_reason,
        "problems": problems,
        "problem_groups": groups,
        # the lines after the item groups: collection errors, corrupt lines, deselection, no items
        "other_problems": problems[len(groups):],
    }


def _parse_time(text: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None


def run_facts(run: RunData) -> list[tuple[str, str]]:
    """The header line a sign-off names: when it finished, how long it took, where, on which GPU."""
    header = run.headers[0] if run.headers else {}
    env = header.get("environment") or {}
    started = _parse_time(header.get("started_at"))
    finished = max((t for f in run.footers if (t := _parse_time(f.get("finished_at"))) is not None), default=None)
    if started is not None and finished is not None:
        seconds = (finished - started).total_seconds()
        minutes, secs = divmod(round(seconds), 60)
        duration = f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
    else:
        duration = "unknown (no end-of-run record)"
    return [
        ("finished", finished.isoformat() if finished is not None else "did not finish (no end-of-run record)"),
        ("duration", duration),
        ("host", str(env.get("hostname") or "not recorded")),
        ("GPU", str(env.get("gpu") or ("none (" + str(env["gpu_error"]) + ")" if env.get("gpu_error") else "not recorded"))),
    ]


def _rows(run: RunData, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (contract, FT, model): the prediction record and its control records.

    Rows follow each contract's own order; a test with no record at all (its
    contract was loaded but none of its items ran) still gets a row.
    """
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        by_model = groups.setdefault((str(r.get("contract") or ""), str(r.get("id"))), {})
        model = shown_model(r)
        row = by_model.setdefault(model or "", {"model": model, "prediction": None, "controls": []})
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


# -- charts -------------------------------------------------------------------------------------


def _who(record: dict[str, Any]) -> str:
    return f"control {record['control']}" if record.get("control") else str(record.get("subject") or "subject")


def _series_of(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [s for s in (record or {}).get("series", []) if isinstance(s, dict) and s.get("x") is not None]


def row_charts(row: dict[str, Any]) -> list[Markup]:
    """The charts for one (FT, model) row, from the series its prediction and controls recorded.

    A memory timeline or a loss curve of the prediction and its controls share one
    chart (the control crossing the budget next to the subject that stays under it);
    a parity scatter gets one chart per item plus the prediction's error histogram.
    """
    items = [r for r in [row.get("prediction"), *row.get("controls", [])] if r]
    by_name: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in items:
        for s in _series_of(r):
            by_name.setdefault(str(s.get("name")), []).append((r, s))
    out: list[Markup] = []
    for name, pairs in by_name.items():
        first = pairs[0][1]
        meta = first.get("meta") or {}
        kind = first.get("kind", "line")
        if kind == "scatter":
            for r, s in pairs:
                out.append(charts.scatter_chart(
                    [charts.Trace(_who(r), s["x"], s["y"], charts.PALETTE[1] if r.get("control") else "")],
                    title=_title(name) + (" (control)" if r.get("control") else ""), xlabel=str(meta.get("xlabel", "x")),
                    ylabel=str(meta.get("ylabel", "y"))))
                if not r.get("control"):
                    xs, ys = charts.finite_pairs(s["x"], s["y"])
                    out.append(charts.histogram_chart(
                        [b - a for a, b in zip(xs, ys, strict=True)],
                        title=f"error of {_who(r)}, {len(xs)} logits",
                        xlabel=f"{meta.get('ylabel', 'y')} - {meta.get('xlabel', 'x')}"))
        elif kind == "histogram":
            for r, s in pairs:
                out.append(charts.histogram_chart(s["y"], title=f"{name}: {_who(r)}", xlabel=str(meta.get("xlabel", ""))))
        else:
            traces = [charts.Trace(_who(r) + _baseline(s), s["x"], s["y"],
                               charts.PALETTE[1] if r.get("control") else charts.PALETTE[0]) for r, s in pairs]
            out.append(_line_for(name, meta, traces, pairs))
    return out


_TITLES = {"kd_loss": "KD loss per step (one distillation epoch)", "vs_f32_dequant_parity": "logits vs F32 dequant",
           "vs_transformers_parity": "logits vs transformers"}


def _title(name: str) -> str:
    return _TITLES.get(name, name)


def _baseline(series: dict[str, Any]) -> str:
    base = (series.get("meta") or {}).get("baseline_gb")
    return f" (baseline {float(base):.2f} GB)" if isinstance(base, int | float) else ""


def _line_for(name: str, meta: dict[str, Any], traces: list[charts.Trace],
              pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> Markup:
    if name.endswith("memory_timeline"):
        budget = next((s.get("meta", {}).get("budget_gb") for _, s in pairs if s.get("meta", {}).get("budget_gb")), None)
        hlines = [charts.HLine(float(budget), f"budget {float(budget):g} GB")] if budget is not None else []
        return charts.line_chart(
            traces, title="GPU memory above the pre-load baseline (NVML)", hlines=hlines,
            xlabel="time since sampling started (s)", ylabel=f"device memory used ({meta.get('unit', 'GB')})")
    return charts.line_chart(traces, title=_title(name), xlabel=str(meta.get("xlabel", "x")), ylabel=str(meta.get("ylabel", "y")),
                             markers=max(len(t.x) for t in traces) <= 50)


def hypothesis_stats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items whose falsifier ran a Hypothesis search: examples run, budget, shrunk counterexample."""
    out = []
    for r in records:
        m = r.get("measurements") or {}
        if "hypothesis_examples" not in m:
            continue
        out.append({
            "label": _label(r), "record": r,
            "examples": (m.get("hypothesis_examples") or {}).get("value"),
            "max_examples": (m.get("hypothesis_max_examples") or {}).get("value"),
            "counterexample": (m.get("counterexample") or {}).get("value"),
        })
    return out


def hypothesis_chart(stats: list[dict[str, Any]]) -> Markup | None:
    bars = [(s["label"], float(s["examples"]), charts.PALETTE[1] if s["counterexample"] is not None else charts.PALETTE[0])
            for s in stats if isinstance(s["examples"], int | float)]
    if not bars:
        return None
    return charts.bar_chart(bars, title="Hypothesis examples run per item (orange: a counterexample was found and shrunk)",
                            xlabel="examples generated and tried (shrinking included)")


# -- environment and workers ------------------------------------------------------------------


def _versions(env: dict[str, Any], *names: str) -> str:
    found = [f"{n} {env[n]}" for n in names if env.get(n)]
    return ", ".join(found) if found else "not recorded"


def key_environment(env: dict[str, Any]) -> list[tuple[str, str]]:
    """The facts a sign-off names, in a fixed order; "not recorded" where the run lacked them."""
    commit = env.get("git_commit")
    dirty = env.get("git_dirty")
    cuda = [f"driver supports {env['cuda_driver']}" if env.get("cuda_driver") else "",
            f"torch built for {env['torch_cuda']}" if env.get("torch_cuda") else "",
            f"CuPy runtime {env['cupy_cuda_runtime']}" if env.get("cupy_cuda_runtime") else ""]
    return [
        ("GPU", str(env.get("gpu") or env.get("gpu_error") or "not recorded")),
        ("driver", str(env.get("gpu_driver") or "not recorded")),
        ("CUDA", ", ".join(c for c in cuda if c) or "not recorded"),
        ("torch / CuPy / numpy / pynvml", _versions(env, "torch", "cupy-cuda13x", "cupy-cuda12x", "numpy", "nvidia-ml-py")),
        ("git commit", (f"{commit}" + (" (working tree had uncommitted changes)" if dirty else " (clean)" if dirty is False else ""))
         if commit else "not recorded (no git checkout where it ran)"),
        ("Python", f"{env.get('python', '?')} on {env.get('platform', '?')}"),
    ]


def environment_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per process that wrote a header (the controller or each xdist worker): its GPU facts."""
    rows = []
    for h in run.headers:
        env = h.get("environment") or {}
        gpus = env.get("gpus") or []
        rows.append({
            "worker": h.get("worker") or "main",
            "visible": env.get("cuda_visible_devices"),
            "gpus": "; ".join(f"{g.get('index')}: {g.get('name')} ({g.get('memory_total_gb', 0):.1f} GB)" for g in gpus)
                    or env.get("gpu_error") or ("none found" if "gpus" in env else "not recorded by this run"),
        })
    return rows


def worker_table(run: RunData, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which worker and GPU ran which items (empty for a single-process run on no pinned GPU)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in records:
        if r.get("worker") or r.get("gpu"):
            groups.setdefault((str(r.get("worker") or "main"), str(r.get("gpu") or "-")), []).append(_label(r))
    return [{"worker": w, "gpu": g, "labels": labels} for (w, g), labels in sorted(groups.items())]


# -- comparison with the previous run ---------------------------------------------------------


def _first_header_run_id(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            first = json.loads(fh.readline() or b"{}")
    except (OSError, ValueError):
        return None
    return str(first["run_id"]) if isinstance(first, dict) and first.get("run_id") else None


def find_previous(results_jsonl: Path, run_id: str) -> Path | None:
    """The newest other run that started before this one: reports/<run-id>/results.jsonl beside
    this run's folder, or another results*.jsonl in the same folder. Run ids sort by start time."""
    here = results_jsonl.resolve()
    candidates = [*here.parent.parent.glob("*/results.jsonl"), *here.parent.glob("results*.jsonl")]
    best: tuple[str, Path] | None = None
    for path in candidates:
        if path.resolve() == here:
            continue
        other = _first_header_run_id(path)
        if other is not None and other < run_id and (best is None or other > best[0]):
            best = (other, path)
    return best[1] if best else None


def _number(m: Any) -> float | None:
    value = m.get("value") if isinstance(m, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def compare_runs(records: list[dict[str, Any]], previous: list[dict[str, Any]]) -> dict[str, Any]:
    """Verdicts that changed and scalar measurements that moved by more than MOVED_FRACTION."""
    before = {str(r.get("nodeid")): r for r in previous}
    changed, moved, new = [], [], []
    for r in records:
        old = before.pop(str(r.get("nodeid")), None)
        if old is None:
            new.append(_label(r))
            continue
        if old.get("verdict") != r.get("verdict"):
            changed.append({"label": _label(r), "before": old.get("verdict"), "after": r.get("verdict"),
                            "control": r.get("control")})
        old_m = old.get("measurements") or {}
        for name, m in (r.get("measurements") or {}).items():
            a, b = _number(old_m.get(name)), _number(m)
            if a is None or b is None or a == b:
                continue
            if m.get("unit") == "s" and max(abs(a), abs(b)) < TIMING_FLOOR_S:
                continue
            rel = abs(b - a) / abs(a) if a else math.inf
            if rel > MOVED_FRACTION:
                moved.append({"label": _label(r), "name": name, "before": a, "after": b,
                              "unit": m.get("unit", ""), "change": "new non-zero" if a == 0 else f"{(b - a) / abs(a):+.1%}"})
    return {"changed": changed, "moved": moved, "new": new, "gone": [_label(r) for r in before.values()]}


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


def model_facts(record: dict[str, Any] | None, limit: int = 8) -> list[tuple[str, Any]]:
    """The whole-number measurements of a row's own item (vocab sizes, dimensions, counts).

    A rule is written once per test, often with the numbers of its main model (FT-VOCAB-ALIGN-001
    names 152064/151936); the row of another model shows what that model measured instead.
    Integers, because those are the structural facts; measured results are in the comparisons.
    """
    out = []
    for name, m in ((record or {}).get("measurements") or {}).items():
        value = m.get("value") if isinstance(m, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            out.append((name, value))
    return out[:limit]


def render_html(run: RunData, records: list[dict[str, Any]], overall: dict[str, Any],
                comparison: dict[str, Any] | None = None) -> str:
    header = run.headers[0] if run.headers else {}
    env = _env()
    env.filters["fmt"] = _fmt
    # contract -> tests in contract order -> one row per model: the rule is printed once per test
    by_contract: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(run, records):
        row["charts"] = row_charts(row)
        row["facts"] = model_facts(row.get("prediction"))
        tests = by_contract.setdefault(row["contract"], [])
        if not tests or tests[-1]["test"]["id"] != row["test"]["id"]:
            tests.append({"test": row["test"], "rows": []})
        tests[-1]["rows"].append(row)
    hypothesis = hypothesis_stats(records)
    return env.get_template("report.html").render(
        run_id=run.run_id,
        header=header,
        environment=header.get("environment", {}),
        overall=overall,
        run_facts=run_facts(run),
        contracts={c["path"]: c for c in run.contracts},
        by_contract=by_contract,
        collection_errors=run.collection_errors,
        corrupt_lines=run.corrupt_lines,
        binding_errors={k: v for h in run.headers for k, v in h.get("binding_errors", {}).items()},
        passes=_passes,
        hypothesis=hypothesis,
        hypothesis_chart=hypothesis_chart(hypothesis),
        gpu_rows=environment_rows(run),
        key_environment=key_environment(header.get("environment") or {}),
        workers=worker_table(run, records),
        comparison=comparison,
        timing_floor_s=TIMING_FLOOR_S,
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


def build_report(results_jsonl: str | Path, out_dir: str | Path | None = None,
                 previous: str | Path | None = None) -> Built:
    """Write the report files; ``previous`` (default: found in reports/) is the run to compare with."""
    run = read_results(results_jsonl)
    out = Path(out_dir) if out_dir is not None else Path(results_jsonl).parent
    out.mkdir(parents=True, exist_ok=True)
    records = run.results + _unfinished_records(run)
    overall = overall_verdict(run, records)
    prev_path = Path(previous) if previous is not None else find_previous(Path(results_jsonl), run.run_id)
    comparison = None
    if prev_path is not None and prev_path.is_file():
        prev = read_results(prev_path)
        comparison = compare_runs(records, prev.results + _unfinished_records(prev))
        comparison.update(run_id=prev.run_id, path=str(prev_path))
    paths = {"html": out / "report.html", "json": out / "results.json", "junit": out / "junit.xml"}
    slim = [
        {k: r.get(k) for k in ("id", "control", "model", "verdict", "reason", "measurements", "comparisons",
                               "nodeid", "contract", "duration_s", "passed", "worker", "gpu")}
        for r in records
    ]
    _write(paths["json"], json.dumps(slim, indent=2, default=str))
    _write(paths["junit"], junit_xml(records, run, overall))
    _write(paths["html"], render_html(run, records, overall, comparison))
    return Built(paths, overall)
