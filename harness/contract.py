"""Load and validate contract YAML files.

YAML is parsed with a ``SafeLoader`` subclass (no object construction, no
tags) that remembers the line of every mapping and every key, so each error
can name the file, the line and the field at fault.

The binding rule (documented in README.md, "Contract schema"):

* ``check.falsifier`` must be a *known* name: registered in
  :data:`harness.registry.FALSIFIERS`, or *planned* (declared in
  :data:`harness.registry.PLANNED_FALSIFIERS`: names from the interface table
  in docs/ARCHITECTURE.md that a later change will implement). A planned but
  unregistered falsifier makes the item UNBOUND; any other name is a typo and
  a collection error.
* ``check.subject`` and ``check.controls`` follow the same rule against
  :data:`~harness.registry.SUBJECTS` / :data:`~harness.registry.PLANNED_SUBJECTS`.
* Thresholds are scalars; where the falsifier is registered they must match
  its declared names and types exactly (an int is accepted for a float).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import registry

# Schema parts of the public "provable contracts" format that this project
# loads and lists but never executes: the report shows them as not applicable.
NOT_EXECUTED_SECTIONS = ("equations", "proof_obligations", "kani_harnesses", "qa_gate")
KNOWN_TOP_LEVEL = {"metadata", "falsification_tests", *NOT_EXECUTED_SECTIONS}
FT_FIELDS = {"id", "rule", "prediction", "if_fails", "evidence", "check"}
CHECK_FIELDS = {
    "falsifier",
    "subject",
    "controls",
    "requires",
    "models",
    "cases",
    "thresholds",
    "params",
    "timeout_s",
}
REQUIRED_FT_FIELDS = ("id", "rule", "prediction")


class ContractError(Exception):
    """A contract that cannot be collected. The message names file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field_name: str, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field_name
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: field '{field_name}': {message}")

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "field": self.field, "message": self.message}


# --- YAML with line numbers ----------------------------------------------------


class LineDict(dict[Any, Any]):
    """A mapping from YAML that knows its own line and each key's line (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list[Any]):
    line: int = 0


# A contract is a page of prose and a few checks; a larger file is a mistake or an attack,
# and the report would copy it
MAX_CONTRACT_BYTES = 1 << 20


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records start marks; it constructs only plain YAML types.

    Aliases are refused: ten nested ``*a`` of ten items each turn 1 KB of YAML into
    10^10 nodes (the "billion laughs"), and a contract has no need of them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(str(event.anchor), event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark
            ) from None
        if key in result:
            raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


class _AliasRefused(Exception):
    def __init__(self, anchor: str, line: int) -> None:
        self.anchor, self.line = anchor, line


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        self.key, self.line = key, line


def load_yaml(path: Path, shown: Path | None = None) -> Any:
    """Parse one YAML file safely; syntax errors become a ContractError with the line.

    ``shown`` is the name errors use for the file (default: ``path``).
    """
    try:
        size = path.stat().st_size
        if size > MAX_CONTRACT_BYTES:
            raise ContractError(shown or path, None, "<file>",
                                f"{size} bytes: a contract may have at most {MAX_CONTRACT_BYTES}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError(shown or path, None, "<file>", f"cannot read: {exc}") from None
    path = shown or path
    try:
        return yaml.load(text, Loader=_LineLoader)  # _LineLoader is a SafeLoader: plain types only
    except _AliasRefused as exc:
        raise ContractError(
            path, exc.line, "<yaml>",
            f"YAML alias '*{exc.anchor}' refused: aliases can expand a small file without bound; "
            "write the value out in full",
        ) from None
    except _DuplicateKey as exc:
        raise ContractError(path, exc.line, exc.key, "key appears twice in the same mapping") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ContractError(path, line, "<yaml>", f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ContractError(path, None, "<yaml>", f"YAML error: {exc}") from None


# --- the model -------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    falsifier: str
    subject: str
    controls: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    # one item per (model, case): the falsifier reads ctx.case (e.g. FT-003's kernel paths)
    cases: tuple[str, ...] = ()
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None  # enforced by harness.runner: past it the item is ERROR
    line: int = 0

    @property
    def bound(self) -> bool:
        return self.falsifier in registry.FALSIFIERS

    def subject_bound(self, name: str) -> bool:
        return name in registry.SUBJECTS


@dataclass(frozen=True)
class FalsificationTest:
    id: str
    rule: str
    prediction: str
    if_fails: str
    evidence: Any
    check: Check | None
    line: int
    path: str
    # "file:line" of another test with this id (this file, or one loaded before): the
    # plugin makes every such test ERROR alone, naming each place
    duplicate_of: str | None = None

    @property
    def place(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Contract:
    path: str
    metadata: Mapping[str, Any]
    tests: list[FalsificationTest]
    # section name -> short descriptions of its entries ("not applicable (not executed)")
    not_applicable: dict[str, list[str]] = field(default_factory=dict)
    # "field at line N" for keys this schema does not know: tolerated, reported
    unknown_keys: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the report needs, so it can be rebuilt from results.jsonl alone."""
        md = self.metadata
        return {
            "path": self.path,
            "title": str(md.get("title") or md.get("name") or Path(self.path).stem),
            "version": str(md.get("version", "")),
            "description": str(md.get("description", "")),
            "tests": [
                {
                    "id": t.id,
                    "rule": t.rule,
                    "prediction": t.prediction,
                    "if_fails": t.if_fails,
                    "evidence": t.evidence if isinstance(t.evidence, str | type(None)) else str(t.evidence),
                    "falsifier": t.check.falsifier if t.check else None,
                    "bound": bool(t.check and t.check.bound),
                    "thresholds": dict(t.check.thresholds) if t.check else {},
                    "controls": list(t.check.controls) if t.check else [],
                }
                for t in self.tests
            ],
            "not_applicable": self.not_applicable,
            "unknown_keys": self.unknown_keys,
        }


# --- validation ------------------------------------------------------------------


def _line(node: Any, key: Any = None) -> int | None:
    if isinstance(node, LineDict):
        return node.line_of(key) if key is not None else node.line
    return getattr(node, "line", None)


def _describe(entry: Any, index: int) -> str:
    if isinstance(entry, Mapping):
        for key in ("id", "name", "harness", "title"):
            if key in entry:
                text = str(entry[key])
                extra = entry.get("formula") or entry.get("statement") or entry.get("property")
                return f"{text}: {extra}" if extra else text
        return ", ".join(f"{k}={v}" for k, v in list(entry.items())[:2])
    return str(entry) if entry is not None else f"#{index + 1}"


def _not_applicable(section: Any) -> list[str]:
    if isinstance(section, Mapping):
        return [f"{k}: {_describe(v, i) if isinstance(v, Mapping) else v}" for i, (k, v) in enumerate(section.items())]
    if isinstance(section, list):
        return [_describe(e, i) for i, e in enumerate(section)]
    return [] if section is None else [str(section)]


def _str_list(path: Path, node: LineDict, key: str, where: str) -> tuple[str, ...]:
    value = node.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ContractError(path, _line(node, key), f"{where}.{key}", "must be a list of names")
    return tuple(value)


def _check_name(
    path: Path, line: int | None, field_name: str, name: str, kind: str,
    registered: Iterable[str], planned: Iterable[str],
) -> None:
    registered, planned = set(registered), set(planned)
    if name not in registered and name not in planned:
        raise ContractError(
            path, line, field_name,
            f"unknown {kind} {name!r}: not registered and not planned "
            f"(registered: {sorted(registered) or 'none'}; planned: {sorted(planned - registered) or 'none'})",
        )


def _type_ok(value: Any, expected: type) -> bool:
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _parse_check(path: Path, ft_id: str, node: Any, ft_line: int | None, unknown: list[str]) -> Check:
    where = f"{ft_id}.check"
    if not isinstance(node, LineDict):
        raise ContractError(path, ft_line, where, "must be a mapping")
    for key in node:
        if key not in CHECK_FIELDS:
            unknown.append(f"{where}.{key} (line {node.line_of(key)})")
    falsifier = node.get("falsifier")
    if not isinstance(falsifier, str) or not falsifier:
        raise ContractError(path, _line(node, "falsifier"), f"{where}.falsifier", "required: the name of a registered falsifier")
    _check_name(path, _line(node, "falsifier"), f"{where}.falsifier", falsifier, "falsifier",
                registry.FALSIFIERS, registry.PLANNED_FALSIFIERS)
    subject = node.get("subject")
    if not isinstance(subject, str) or not subject:
        raise ContractError(path, _line(node, "subject"), f"{where}.subject", "required: the name of a registered subject")
    _check_name(path, _line(node, "subject"), f"{where}.subject", subject, "subject",
                registry.SUBJECTS, registry.PLANNED_SUBJECTS)
    controls = _str_list(path, node, "controls", where)
    ctl_node = node.get("controls")
    for i, control in enumerate(controls):
        line = ctl_node.line if isinstance(ctl_node, LineList) and ctl_node.line else _line(node, "controls")
        _check_name(path, line, f"{where}.controls[{i}]", control, "control subject",
                    registry.SUBJECTS, registry.PLANNED_SUBJECTS)
    if len(set(controls)) != len(controls):
        raise ContractError(path, _line(node, "controls"), f"{where}.controls", "names a control twice")
    requires = _str_list(path, node, "requires", where)
    for i, req in enumerate(requires):
        if not (req == "cuda" or req.startswith(("package:", "model:"))):
            raise ContractError(path, _line(node, "requires"), f"{where}.requires[{i}]",
                                f"unknown requirement {req!r}: use 'cuda', 'package:NAME' or 'model:NAME'")
    models = _str_list(path, node, "models", where)
    cases = _str_list(path, node, "cases", where)
    if len(set(cases)) != len(cases):
        raise ContractError(path, _line(node, "cases"), f"{where}.cases", "names a case twice")
    thresholds = node.get("thresholds", {}) or {}
    if not isinstance(thresholds, Mapping):
        raise ContractError(path, _line(node, "thresholds"), f"{where}.thresholds", "must be a mapping name -> value")
    spec = registry.FALSIFIERS.get(falsifier)
    for key, value in thresholds.items():
        tline = _line(thresholds, key)
        tfield = f"{where}.thresholds.{key}"
        if not isinstance(value, int | float | str | bool):
            raise ContractError(path, tline, tfield, f"must be a scalar, got {type(value).__name__}")
        if spec is None:
            continue
        expected = spec.thresholds.get(str(key))
        if expected is None:
            raise ContractError(path, tline, tfield,
                                f"falsifier {falsifier!r} declares no threshold {key!r} (declares: {sorted(spec.thresholds) or 'none'})")
        if not _type_ok(value, expected):
            raise ContractError(path, tline, tfield,
                                f"must be of type {expected.__name__}, got {type(value).__name__} {value!r}")
    if spec is not None:
        missing = sorted(set(spec.thresholds) - {str(k) for k in thresholds})
        if missing:
            raise ContractError(path, _line(node, "thresholds"), f"{where}.thresholds",
                                f"falsifier {falsifier!r} needs threshold(s) {missing}")
    params = node.get("params", {}) or {}
    if not isinstance(params, Mapping):
        raise ContractError(path, _line(node, "params"), f"{where}.params", "must be a mapping")
    timeout = node.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise ContractError(path, _line(node, "timeout_s"), f"{where}.timeout_s", "must be a positive number of seconds")
    return Check(
        falsifier=falsifier, subject=subject, controls=controls, requires=requires, models=models, cases=cases,
        thresholds=dict(thresholds), params=dict(params),
        timeout_s=float(timeout) if timeout is not None else None, line=node.line,
    )


def parse_contract(path: Path, data: Any, seen_ids: dict[str, str] | None = None) -> Contract:
    """Validate parsed YAML. ``seen_ids`` maps FT ids already loaded to "file:line"."""
    seen = seen_ids if seen_ids is not None else {}
    if not isinstance(data, LineDict):
        raise ContractError(path, _line(data) or 1, "<document>", "a contract is a YAML mapping at top level")
    unknown = [f"{k} (line {data.line_of(k)})" for k in data if k not in KNOWN_TOP_LEVEL]
    metadata = data.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ContractError(path, _line(data, "metadata") if "metadata" in data else 1, "metadata", "required mapping is missing")
    fts = data.get("falsification_tests")
    if not isinstance(fts, list) or not fts:
        raise ContractError(path, _line(data, "falsification_tests") if "falsification_tests" in data else 1,
                            "falsification_tests", "required: a non-empty list of tests")
    tests: list[FalsificationTest] = []
    local: dict[str, str] = {}
    for index, ft in enumerate(fts):
        label = f"falsification_tests[{index}]"
        if not isinstance(ft, LineDict):
            raise ContractError(path, getattr(fts, "line", None), label, "must be a mapping")
        for req in REQUIRED_FT_FIELDS:
            value = ft.get(req)
            if not isinstance(value, str) or not value.strip():
                ident = ft.get("id") if isinstance(ft.get("id"), str) else label
                raise ContractError(path, _line(ft, req), f"{ident}.{req}" if ident != label else f"{label}.{req}",
                                    "required text field is missing or empty")
        ft_id = str(ft["id"]).strip()
        here = f"{path}:{ft.line}"
        # not an error of the whole file: only the tests sharing the id fail (see the plugin)
        duplicate_of = local.get(ft_id) or seen.get(ft_id)
        local.setdefault(ft_id, here)
        for key in ft:
            if key not in FT_FIELDS:
                unknown.append(f"{ft_id}.{key} (line {ft.line_of(key)})")
        check = _parse_check(path, ft_id, ft["check"], ft.line_of("check"), unknown) if "check" in ft else None
        tests.append(FalsificationTest(
            id=ft_id, rule=str(ft["rule"]).strip(), prediction=str(ft["prediction"]).strip(),
            if_fails=str(ft.get("if_fails") or "").strip(), evidence=ft.get("evidence"),
            check=check, line=ft.line, path=str(path), duplicate_of=duplicate_of,
        ))
    for ft_id, here in local.items():
        seen.setdefault(ft_id, here)
    not_applicable = {s: _not_applicable(data[s]) for s in NOT_EXECUTED_SECTIONS if s in data}
    return Contract(str(path), metadata, tests, not_applicable, unknown)


def load_contract(
    path: str | Path, seen_ids: dict[str, str] | None = None, shown: str | Path | None = None
) -> Contract:
    """Load, parse and validate one contract file (loads the falsifier bindings first).

    ``shown`` names the file in errors and the report (e.g. relative to the rootdir).
    """
    registry.load_bindings()
    p = Path(path)
    name = Path(shown) if shown is not None else p
    return parse_contract(name, load_yaml(p, name), seen_ids)
