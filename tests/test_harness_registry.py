"""harness.registry and the falsifiers package: names, re-imports, broken modules."""

from __future__ import annotations

import importlib
import pkgutil
from types import SimpleNamespace

import pytest

import falsifiers
from harness import registry


def test_a_second_function_under_a_taken_name_is_refused() -> None:
    @registry.falsifier("_reg_unique_name")
    def first(ctx: object) -> None: ...

    def other(ctx: object) -> None: ...

    with pytest.raises(ValueError, match="registered twice"):
        registry.falsifier("_reg_unique_name")(other)


def test_the_same_definition_imported_again_re_registers() -> None:
    def make() -> object:
        def fn(ctx: object) -> None: ...

        return fn

    a, b = make(), make()  # same module and qualname, different objects (a re-import)
    registry.subject("_reg_reimported")(a)  # type: ignore[arg-type]
    registry.subject("_reg_reimported")(b)  # type: ignore[arg-type]
    assert registry.SUBJECTS["_reg_reimported"].factory is b


def test_a_module_that_fails_to_import_is_recorded_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def fake_iter(path: object) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="zz_broken"), SimpleNamespace(name="vocab_alignment")]

    def fake_import(name: str, package: str | None = None) -> object:
        if name == "falsifiers.zz_broken":
            raise ImportError("No module named 'teacher.not_written_yet'")
        return real_import(name, package)

    monkeypatch.setattr(pkgutil, "iter_modules", fake_iter)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(registry, "BINDING_ERRORS", {})
    falsifiers._import_all()
    assert list(registry.BINDING_ERRORS) == ["falsifiers.zz_broken"]
    assert "teacher.not_written_yet" in registry.BINDING_ERRORS["falsifiers.zz_broken"]
    assert "softmax_support" in registry.FALSIFIERS  # the healthy module still bound its names


def test_every_architecture_name_is_planned() -> None:
    registry.load_bindings()
    for name in ("peak_gpu_memory", "logit_parity", "effective_vocab_property"):
        assert name in registry.PLANNED_FALSIFIERS
    for name in ("q4k-teacher", "dequant-teacher-cuda", "truncate-after-softmax"):
        assert name in registry.PLANNED_SUBJECTS
