"""The pytest plugin: contracts/*.yaml -> one item per (FT, model) and per (FT, model, control).

Loaded through the ``pytest11`` entry point ``q4k_contracts`` when the project is
installed, or from a plain checkout with ``-p harness.plugin`` (use
``-p no:q4k_contracts -p harness.plugin`` where it may also be installed, as
``q4k falsify`` does, so it is never registered twice).

Pytest outcomes: a prediction passes when CORROBORATED; a control passes when
FALSIFIED; ERROR fails; NOT RUN and UNBOUND skip with the reason (and fail under
``--signoff``). The plugin stays silent (writes nothing) in a run that collects
no contract.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from harness import bindings, registry
from harness.contract import ContractError, load_contract
from harness.results import append_line, environment, new_run_id, utc_now, write_latest
from harness.runner import ItemSpec, run_item
from harness.verdict import applicable


@dataclass
class _State:
    contracts_dir: Path
    reports_dir: Path
    run_id: str
    signoff: bool
    bound: bindings.Bindings = field(default_factory=lambda: bindings.Bindings(None, None, None))
    seen_ids: dict[str, str] = field(default_factory=dict)
    contracts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    deselected: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # finished by an earlier session (--resume)
    results_path: Path | None = None
    report_paths: dict[str, Path] = field(default_factory=dict)
    overall: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.reports_dir / self.run_id


_STATE = pytest.StashKey[_State]()
_OLD_SIGTERM = pytest.StashKey[Any]()


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into pytest's own interruption: the session still ends normally."""


_SIGNAL: dict[str, str] = {}  # the signal that stopped the run, for the footer


def _on_sigterm(signum: int, frame: Any) -> None:
    _SIGNAL["name"] = signal.Signals(signum).name
    raise Terminated(f"stopped by {_SIGNAL['name']}")


def _install_sigterm(config: pytest.Config) -> None:
    """On the controller, SIGTERM ends the run like Ctrl-C does: the finished items are already
    in results.jsonl, and the footer and the report (unfinished items marked) are still written.
    A second SIGTERM during that wind-down gets the default action (the process ends)."""
    if hasattr(config, "workerinput") or sys.platform == "win32" or _OLD_SIGTERM in config.stash:
        return
    try:
        config.stash[_OLD_SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (pytest run inside another program)
        pass


def _is_contract_run(config: pytest.Config) -> bool:
    """Whether the command line names the contracts directory, a file in it, or a folder above it."""
    state = config.stash[_STATE]
    for arg in config.args or ["."]:
        path = Path(arg.split("::", 1)[0])
        path = (path if path.is_absolute() else Path(config.invocation_params.dir) / path).resolve()
        if path.is_relative_to(state.contracts_dir) or state.contracts_dir.is_relative_to(path):
            return True
    return False


def pytest_unconfigure(config: pytest.Config) -> None:
    old = config.stash.get(_OLD_SIGTERM, None)
    if old is not None:
        signal.signal(signal.SIGTERM, old)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("q4k", "Q4K falsification contracts")
    group.addoption("--signoff", action="store_true", default=False,
                    help="fail the run unless every test is CORROBORATED and every control FALSIFIED "
                    "(NOT RUN and UNBOUND fail it)")
    group.addoption("--contracts-dir", default=None,
                    help="collect contract YAML files from this directory (default: <rootdir>/contracts)")
    group.addoption("--reports-dir", default=None,
                    help="write reports/<run-id>/ here (default: <rootdir>/reports)")
    group.addoption("--run-id", default=None, help="name of this run's report folder (default: UTC time and pid)")
    group.addoption("--resume", action="store_true", default=False,
                    help="continue the run --run-id names: items with a result there are not run "
                    "again, the rest run and append, and the report covers both (a sign-off killed "
                    "by a time limit goes on where it stopped)")
    group.addoption("--teacher", default=None, metavar="PATH",
                    help="run every item that names a model on this GGUF file instead (the model is "
                    "named by the file's stem)")
    group.addoption("--model", action="append", default=[], metavar="NAME=PATH",
                    help="bind a model name the contracts use to a GGUF file (repeatable)")
    group.addoption("--student", default=None, metavar="NAME|PATH",
                    help="the student for items that pair one with the --teacher file (default: a "
                    "synthetic student sized to the teacher's vocab)")


# -- multi-GPU runners (pytest-xdist) -----------------------------------------------------------


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries, without initialising CUDA.

    CUDA_VISIBLE_DEVICES when set (an empty value means none), else every device NVML counts.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(int(pynvml.nvmlDeviceGetCount()))]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: a CPU machine
        return []


def assign_gpu(worker_id: str, gpus: list[str]) -> str | None:
    """The GPU an xdist worker ("gw3") is pinned to: worker index modulo the GPU count.

    With ``-n auto`` there is one worker per GPU; more workers than GPUs share
    them round-robin. None where there is no GPU (the worker is left alone).
    """
    if not gpus:
        return None
    digits = "".join(ch for ch in worker_id if ch.isdigit())
    if not digits:
        raise ValueError(f"not an xdist worker id: {worker_id!r}")
    return gpus[int(digits) % len(gpus)]


def _pin_worker_gpu(config: pytest.Config) -> None:
    """On an xdist worker, before torch or CuPy create a CUDA context, expose only its GPU.

    Both read CUDA_VISIBLE_DEVICES when CUDA initialises (lazily, at first use),
    so setting it at configure time pins every falsifier of this worker to "cuda:0"
    = its own device. The original list is kept for the record.
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    gpus = visible_gpus()
    gpu = assign_gpu(str(workerinput.get("workerid", "gw0")), gpus)
    if gpu is not None:
        # CUDA numbers devices fastest-first unless told otherwise; NVML (and nvidia-smi) in PCI
        # bus order. Same order on both sides, so "GPU 1" in the report is nvidia-smi's GPU 1.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller, per worker: hand over this run's id."""
    node.workerinput["q4k_run_id"] = str(node.config.option.run_id)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per GPU; on a machine without GPUs xdist's own default (CPU count)."""
    return len(visible_gpus()) or None


def _resolve(config: pytest.Config, value: str | None, default: str) -> Path:
    path = Path(value) if value else config.rootpath / default
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "contract: an item collected from a contract's falsification test")
    config.addinivalue_line("markers", "control: a negative-control item (passes when FALSIFIED)")
    from harness.memory import use_expandable_segments

    use_expandable_segments()  # before any falsifier initialises CUDA
    # The controller picks the run id; xdist workers get it through workerinput
    # (pytest_configure_node), so they all append to one reports/<run-id>/results.jsonl.
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and workerinput.get("q4k_run_id"):
        config.option.run_id = workerinput["q4k_run_id"]
    if config.option.resume and not config.option.run_id:
        raise pytest.UsageError("--resume continues a run: name it with --run-id")
    if not config.option.run_id:
        config.option.run_id = new_run_id()
    config.stash[_STATE] = _State(
        contracts_dir=_resolve(config, config.option.contracts_dir, "contracts"),
        reports_dir=_resolve(config, config.option.reports_dir, "reports"),
        run_id=str(config.option.run_id),
        signoff=bool(config.option.signoff),
    )
    try:
        config.stash[_STATE].bound = bindings.apply(
            config.option.model, config.option.teacher, config.option.student
        )
    except bindings.BindingError as exc:
        raise pytest.UsageError(str(exc)) from None
    if config.option.resume and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Resume(), "q4k-resume")
    if getattr(config.option, "numprocesses", None) and _is_contract_run(config):
        _install_sigterm(config)  # an xdist controller collects nothing itself: decide from the command line
    _pin_worker_gpu(config)


def _is_contract(state: _State, path: Path) -> bool:
    if path.suffix not in (".yaml", ".yml"):
        return False
    return path.resolve().is_relative_to(state.contracts_dir)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    state = parent.config.stash[_STATE]
    if _is_contract(state, file_path):
        return ContractFile.from_parent(parent, path=file_path)
    return None


class ContractFile(pytest.File):
    def collect(self) -> list[pytest.Item]:
        state = self.config.stash[_STATE]
        # name the file as the user sees it (relative to the rootdir) in errors and the report
        try:
            shown = self.path.relative_to(self.config.rootpath)
        except ValueError:
            shown = self.path
        try:
            contract = load_contract(self.path, state.seen_ids, shown=shown)
        except ContractError as exc:
            state.errors.append({"type": "collection_error", "nodeid": self.nodeid, **exc.to_json(), "text": str(exc)})
            raise
        state.contracts.append(contract.summary())
        items: list[pytest.Item] = []
        teacher = state.bound.teacher_name
        names: set[str] = set()
        for ft in contract.tests:
            # a second test of this id in the same file needs its own node id (its line)
            name = ft.id if ft.id not in names else f"{ft.id}@{ft.line}"
            names.add(name)
            models: tuple[str | None, ...] = ft.check.models if ft.check and ft.check.models else (None,)
            if teacher and models != (None,):
                models = (teacher,)  # --teacher: every item that runs on a model runs on the file
            cases: tuple[str | None, ...] = ft.check.cases if ft.check and ft.check.cases else (None,)
            for model in models:
                for case in cases:
                    label = "@".join(p for p in (model, case) if p)
                    base = f"{name}[{label}]" if label else name
                    items.append(ContractItem.from_parent(
                        self, name=base, spec=None, ft=ft, model=model, control=None, case=case))
                    for control in ft.check.controls if ft.check else ():
                        items.append(ContractItem.from_parent(
                            self, name=f"{base}::control[{control}]", spec=None, ft=ft, model=model,
                            control=control, case=case,
                        ))
        return items

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ContractError):
            return f"contract error: {excinfo.value}"
        return str(super().repr_failure(excinfo))


class _ItemFailed(Exception):
    """A contract item did not pass; the message is the verdict and reason."""


class ContractItem(pytest.Item):
    def __init__(self, *, spec: ItemSpec | None, ft: Any, model: str | None, control: str | None,
                 case: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = spec or ItemSpec(ft=ft, model=model, control=control, nodeid=self.nodeid, case=case)
        self.record: dict[str, Any] | None = None
        self.add_marker(pytest.mark.contract)
        if control:
            self.add_marker(pytest.mark.control)

    def runtest(self) -> None:
        state = self.config.stash[_STATE]
        options: dict[str, Any] = {"run_dir": str(state.run_dir)}
        if state.bound.student:
            options["student"] = state.bound.student
        if state.bound.teacher_path is not None:
            options["teacher_file"] = str(state.bound.teacher_path)
        record = run_item(self.spec, run_id=state.run_id, options=options)
        self.record = record
        if state.results_path is not None:
            append_line(state.results_path, record)
        verdict, reason = record["verdict"], record["reason"]
        if record["passed"] is None:
            # not applicable here (what it tests does not exist on this machine): a skip
            # even in a sign-off run; the report counts it apart
            if state.signoff and applicable(record):
                raise _ItemFailed(f"{verdict} fails a sign-off run: {reason}")
            # reported at the contract's line, not at this line of the plugin
            raise pytest.skip.Exception(f"{verdict}: {reason}", _use_item_location=True)
        if not record["passed"]:
            raise _ItemFailed(f"{verdict}: {reason}" + (f"\n{record['traceback']}" if record["traceback"] else ""))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, _ItemFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, self.spec.ft.line - 1, f"{self.spec.ft.id}: {self.spec.ft.rule}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test whose id another collected test also has becomes ERROR, naming all the
    places; the other tests of those files run. Decided over the whole collection (before
    -k/-m deselect anything), so no file wins or loses by the order files are collected."""
    places: dict[str, set[str]] = {}
    for item in items:
        if isinstance(item, ContractItem):
            places.setdefault(item.spec.ft.id, set()).add(item.spec.ft.place)
    for item in items:
        if not isinstance(item, ContractItem):
            continue
        where = places[item.spec.ft.id]
        if len(where) > 1:
            others = sorted(where - {item.spec.ft.place})
            item.spec = replace(item.spec, error=(
                f"duplicate falsification test id {item.spec.ft.id!r}: defined here "
                f"({item.spec.ft.place}) and at {', '.join(others)}; ids must be unique"
            ))


class _Resume:
    """--resume (registered only then): drop the items the run already has a result for,
    after -k/-m (trylast), so a narrower selection still narrows what is left."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        _drop_finished(config, items)


def _drop_finished(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[_STATE]
    path = state.run_dir / "results.jsonl"
    if not path.exists():
        raise pytest.UsageError(f"--resume: {path} does not exist (no run {state.run_id!r} to continue)")
    from harness.results import read_results

    before = read_results(path)
    _check_same_run(before.headers, state, path)
    done = before.finished_ids
    state.resumed = [i.nodeid for i in items if i.nodeid in done]
    items[:] = [i for i in items if i.nodeid not in done]


def _check_same_run(headers: list[dict[str, Any]], state: _State, path: Path) -> None:
    """A resumed run must judge the same thing: same --signoff, --teacher file and student."""
    first = headers[0] if headers else None
    if first is None:
        raise pytest.UsageError(f"--resume: {path} has no header line; it is not a run to continue")
    if bool(first.get("signoff")) != state.signoff:
        raise pytest.UsageError(f"--resume: run {state.run_id!r} was started with signoff={first.get('signoff')}; "
                                "resume it the same way")
    was = first.get("teacher_file") or {}
    now = state.bound.teacher_path
    if (was.get("path") or None) != (str(now.resolve()) if now is not None else None) or (
        now is not None and was.get("size_bytes") != now.stat().st_size
    ):
        raise pytest.UsageError(f"--resume: run {state.run_id!r} judged --teacher {was.get('path')}; "
                                f"this session names {now}")
    if first.get("student") != state.bound.student:
        raise pytest.UsageError(f"--resume: run {state.run_id!r} used student {first.get('student')!r}, "
                                f"this session {state.bound.student!r}")


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, ContractItem):
            item.config.stash[_STATE].deselected.append(item.nodeid)


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash[_STATE]
    items = [i for i in session.items if isinstance(i, ContractItem)]
    if (not items and not state.errors and not state.resumed) or config.option.collectonly:
        return  # not a contract run (or only listing items): write nothing
    if state.errors:
        # A broken contract is reported as its own collection error; it must not stop the others.
        config.option.continue_on_collection_errors = True
    state.run_dir.mkdir(parents=True, exist_ok=True)
    state.results_path = state.run_dir / "results.jsonl"
    if not hasattr(config, "workerinput") and state.results_path.exists() and not config.option.resume:
        # a --run-id used again: keep the old evidence, but never mix two runs in one file
        state.results_path.rename(state.run_dir / f"results.jsonl.{new_run_id()}.old")
    registry.load_bindings()
    append_line(state.results_path, {
        "type": "header",
        "schema": 1,
        "run_id": state.run_id,
        "started_at": utc_now(),
        "signoff": state.signoff,
        "argv": sys.argv,
        "worker": os.environ.get("PYTEST_XDIST_WORKER"),
        "environment": environment(config.rootpath),
        "expected": [i.nodeid for i in items] + state.resumed,
        "resumed": state.resumed,  # finished by the session(s) before this one (--resume)
        "expected_items": [
            {"nodeid": i.nodeid, "id": i.spec.ft.id, "model": i.spec.model, "case": i.spec.case,
             "control": i.spec.control,
             "contract": i.spec.ft.path}
            for i in items
        ],
        "deselected": state.deselected,  # a partial run (-k, -m) is never sign-off ready
        "contracts": state.contracts,
        "binding_errors": dict(registry.BINDING_ERRORS),
        # --teacher: what the sign-off is about (hashing reads the file once, on the controller)
        "teacher_file": (bindings.teacher_facts(state.bound.teacher_path)
                         if state.bound.teacher_path is not None and not hasattr(config, "workerinput")
                         else None),
        "student": state.bound.student,
    })
    for error in state.errors:
        append_line(state.results_path, {**error, "run_id": state.run_id})
    if not hasattr(config, "workerinput"):
        write_latest(state.reports_dir, state.run_id)
        # only now is this known to be a contract run: a plain `pytest tests` (the plugin loaded
        # through its entry point) keeps SIGTERM as it was
        _install_sigterm(config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is None or hasattr(config, "workerinput"):
        return  # xdist workers append results; the controller writes the report
    results = state.run_dir / "results.jsonl"
    if not results.exists():
        return
    # the rest of the session must not be cut short by a second SIGTERM raising mid-report
    if config.stash.get(_OLD_SIGTERM, None) is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    footer: dict[str, Any] = {"type": "footer", "run_id": state.run_id, "finished_at": utc_now(), "exitstatus": int(exitstatus)}
    if int(exitstatus) == int(pytest.ExitCode.INTERRUPTED):
        footer["interrupted_by"] = _SIGNAL.pop("name", "SIGINT")
    append_line(results, footer)
    write_latest(state.reports_dir, state.run_id)  # an xdist controller collected nothing, so name it here
    from harness.report import build_report

    built = build_report(results, state.run_dir)
    state.report_paths = built.paths
    state.overall = built.overall
    if state.signoff and not built.overall["ready"] and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.report_paths:
        return
    overall = state.overall
    terminalreporter.section("q4k contracts")
    terminalreporter.write_line(f"{overall['label']}: {'; '.join(overall['headline']) or 'no items'}")
    for line in overall["problems"][:20]:
        terminalreporter.write_line(f"  - {line}")
    terminalreporter.write_line(f"report: {state.report_paths['html']}")

