"""Write small, deliberately (in)consistent GGUF models for the consistency tests.

Tensors come from the rules of :data:`teacher.consistency.ARCHITECTURES` with
explicit dims, then the test bends one thing: a metadata key, a tensor dropped,
added or reshaped. Everything is F32 and tiny (a file is a few hundred KB).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from teacher.consistency import ARCHITECTURES, HEAD_RULE

# hidden 64, 4 query heads and 2 KV heads of 16, ffn 96, vocab 128
DIMS = {"vocab": 128, "hidden": 64, "ffn": 96, "q": 64, "kv": 32, "head_dim": 16, "rope_half": 8}
LAYERS = 3


def metadata(arch: str, layers: int = LAYERS) -> dict[str, Any]:
    a = f"{arch}."
    md: dict[str, Any] = {
        a + "block_count": layers,
        a + "context_length": 256,
        a + "embedding_length": DIMS["hidden"],
        a + "feed_forward_length": DIMS["ffn"],
        a + "attention.head_count": 4,
        a + "attention.head_count_kv": 2,
        a + "attention.layer_norm_rms_epsilon": 1e-6,
        a + "vocab_size": DIMS["vocab"],
    }
    if arch == "gemma3":
        md[a + "attention.key_length"] = DIMS["head_dim"]
        md[a + "attention.sliding_window"] = 32
    return md


def tensors(arch: str, layers: int = LAYERS, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """name -> torch-order shape of every tensor the architecture's rules name."""
    rules = list(ARCHITECTURES[arch].rules) + ([] if tied else [HEAD_RULE])
    out: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        for i in range(layers) if rule.per_layer else (0,):
            out[rule.name.format(i=i)] = tuple(DIMS[d] for d in rule.shape)
    return out


def write(
    path: Path,
    arch: str = "llama",
    *,
    layers: int = LAYERS,
    tied: bool = False,
    keys: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    add: Mapping[str, tuple[int, ...]] | None = None,
    tokens: int | None = DIMS["vocab"],
) -> Path:
    """A model file; ``keys`` override metadata (a None value removes the key), ``drop``
    removes tensors, ``add`` adds or reshapes them, ``tokens`` sets the tokenizer's size."""
    md = metadata(arch, layers)
    for k, v in (keys or {}).items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    shapes = tensors(arch, layers, tied)
    shapes.update(add or {})
    for name in drop:
        shapes.pop(name)
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in md.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint64(k, v) if v >= 2**32 else w.add_uint32(k, v)
        else:
            w.add_float32(k, float(v))
    if tokens is not None:
        w.add_token_list([f"t{i}" for i in range(tokens)])
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        # norms at 1 keep a forward finite, should a test run one
        value = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape).astype(np.float32) * 0.05
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
