"""Is an opened GGUF file a consistent model? Checked before anything is decoded or uploaded.

:func:`open_gguf` proves the file is well formed (every tensor inside the file,
every count bounded by its size); it says nothing about whether the metadata
and the tensors describe the *same* model. A file whose ``block_count`` says 29
while it holds 30 layers runs 29 of them without complaint; one that says
1,000,000 fails with a bare ``KeyError`` after a full dequant. Here the header
alone is checked against the tensor set the forward pass needs, so each such
file fails with one :class:`ModelConsistencyError` that names the file and the
key or tensor at fault, and costs no more than reading the header.

The tensors each architecture needs are data: one :class:`ArchSpec` per entry
of :data:`ARCHITECTURES`, built from a few shared groups. Adding an
architecture is one entry (its tensor rules and how its lm_head may be tied).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gguf import GGMLQuantizationType as QT

from teacher import config
from teacher.config import ConfigError, ModelConfig, config_from_metadata
from teacher.gguf_file import GGUFError, GGUFModel, open_gguf

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ModelConsistencyError",
    "ModelReport",
    "TensorRule",
    "check_model",
    "open_checked",
]

log = logging.getLogger("teacher.consistency")

SHOWN = 5  # names listed in an error before "... and N more"

# 1-D tensors (norms, biases, frequency factors) are read as floats; a quantized
# vector is not something a converter writes, so it is a corrupt or foreign file
FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})


class ModelConsistencyError(ConfigError, GGUFError):
    """Metadata and tensors of a GGUF file disagree; the message names the file and the key or tensor.

    It is both a :class:`ConfigError` and a :class:`GGUFError` (hence a ``ValueError``),
    so callers that already handle a bad file keep handling this one."""


# A dimension of a tensor shape, by name; evaluated against the config.
DIMS: dict[str, Callable[[ModelConfig], int]] = {
    "vocab": lambda c: c.vocab_size,
    "hidden": lambda c: c.hidden,
    "ffn": lambda c: c.ffn,
    "q": lambda c: c.n_heads * c.head_dim,  # all query heads
    "kv": lambda c: c.n_kv_heads * c.head_dim,  # all key (or value) heads
    "head_dim": lambda c: c.head_dim,
    "rope_half": lambda c: c.rope_dim // 2,  # one factor per rotated pair
}


@dataclass(frozen=True)
class TensorRule:
    """One tensor the forward reads: ``name`` (``{i}`` = layer index), shape in torch order
    as names of :data:`DIMS`, and whether the file may lack it."""

    name: str
    shape: tuple[str, ...]
    required: bool = True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture's forward needs from the file.

    ``head``: "own" = the lm_head is ``output.weight`` and the file must have it;
    "either" = a file without it ties the head to ``token_embd.weight`` (llama.cpp
    treats it as optional: SmolLM2 and Qwen2.5-0.5B ship tied);
    "tied" = the head is always the embedding (an ``output.weight`` is unused).
    """

    rules: tuple[TensorRule, ...]
    head: Literal["own", "either", "tied"] = "either"


def _r(name: str, *shape: str, required: bool = True) -> TensorRule:
    return TensorRule(name, tuple(shape), required)


GLOBAL = (_r("token_embd.weight", "vocab", "hidden"), _r("output_norm.weight", "hidden"))
LAYER = (
    _r("blk.{i}.attn_norm.weight", "hidden"),
    _r("blk.{i}.attn_q.weight", "q", "hidden"),
    _r("blk.{i}.attn_k.weight", "kv", "hidden"),
    _r("blk.{i}.attn_v.weight", "kv", "hidden"),
    _r("blk.{i}.attn_output.weight", "hidden", "q"),
    _r("blk.{i}.ffn_norm.weight", "hidden"),
    _r("blk.{i}.ffn_gate.weight", "ffn", "hidden"),
    _r("blk.{i}.ffn_up.weight", "ffn", "hidden"),
    _r("blk.{i}.ffn_down.weight", "hidden", "ffn"),
)
QKV_BIAS = (
    _r("blk.{i}.attn_q.bias", "q"),
    _r("blk.{i}.attn_k.bias", "kv"),
    _r("blk.{i}.attn_v.bias", "kv"),
)
QK_NORM = (_r("blk.{i}.attn_q_norm.weight", "head_dim"), _r("blk.{i}.attn_k_norm.weight", "head_dim"))
SANDWICH = (_r("blk.{i}.post_attention_norm.weight", "hidden"), _r("blk.{i}.post_ffw_norm.weight", "hidden"))
# llama 3.x frequency factors: optional (llama 2 and SmolLM2 files have none)
ROPE_FREQS = (_r("rope_freqs.weight", "rope_half", required=False),)



def rules_for(arch: config.ArchSpec) -> ArchSpec:
    """The tensor rules of one entry of the forward's architecture table
    (:data:`teacher.config.ARCHS`): the consistency check follows what the forward
    reads, so an architecture added there is checked here with no second table."""
    groups = [GLOBAL, LAYER]
    for flag, group in ((arch.qkv_bias, QKV_BIAS), (arch.qk_norm, QK_NORM),
                        (arch.sandwich_norms, SANDWICH), (arch.rope_freq_factors, ROPE_FREQS)):
        if flag:
            groups.append(group)
    return ArchSpec(tuple(r for g in groups for r in g))


ARCHITECTURES: dict[str, ArchSpec] = {name: rules_for(a) for name, a in config.ARCHS.items()}

HEAD_RULE = _r("output.weight", "vocab", "hidden")
TOKENS_KEY = "tokenizer.ggml.tokens"
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelReport:
    """A consistent file: its config (``tied_embeddings`` settled) and the tensors it does not use."""

    path: Path
    config: ModelConfig
    head: str  # the lm_head's tensor
    unused: tuple[str, ...]


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _fail(path: Path, what: str) -> ModelConsistencyError:
    return ModelConsistencyError(f"{path}: {what}")


def _check_layers(path: Path, arch: str, n_layers: int, names: Iterable[str]) -> None:
    """block_count against the layers the file holds, before any per-layer name is built
    (a block_count of 10^6 must not cost 10^6 x 9 names)."""
    present = sorted({int(m.group(1)) for n in names if (m := _LAYER_RE.match(n))})
    held = present[-1] + 1 if present else 0
    if held != n_layers:
        raise _fail(
            path,
            f"metadata '{arch}.block_count' = {n_layers} but the file holds tensors of "
            f"{held} layer(s) (blk.0 .. blk.{held - 1})" if held else
            f"metadata '{arch}.block_count' = {n_layers} but the file holds no blk.* tensor",
        )
    gaps = sorted(set(range(held)) - set(present))
    if gaps:
        raise _fail(path, f"no tensor of layer(s) {_some([f'blk.{g}' for g in gaps])}")


def _check_vocab(path: Path, model: GGUFModel, cfg: ModelConfig) -> None:
    """The vocab as the metadata, the tokenizer, the embedding and the head each count it."""
    counts: list[tuple[str, int]] = []
    key = f"{cfg.arch}.vocab_size"
    if key in model.metadata:
        counts.append((f"metadata '{key}'", cfg.vocab_size))
    tokens = model.metadata.get(TOKENS_KEY)
    if isinstance(tokens, Sequence) and not isinstance(tokens, str | bytes):
        counts.append((f"metadata '{TOKENS_KEY}' (tokenizer)", len(tokens)))
    for name in ("token_embd.weight", "output.weight"):
        rec = model.tensors.get(name)
        if rec is not None:
            counts.append((f"rows of tensor '{name}'", rec.shape[0]))
    if len({n for _, n in counts}) > 1:
        raise _fail(path, "the vocab sizes disagree: " + "; ".join(f"{w} = {n}" for w, n in counts))


def _head(path: Path, spec: ArchSpec, arch: str, names: set[str]) -> str:
    has_output = HEAD_RULE.name in names
    if spec.head == "own" and not has_output:
        raise _fail(
            path,
            f"no tensor '{HEAD_RULE.name}': architecture {arch!r} does not tie its lm_head to "
            "token_embd.weight, so the file must have its own",
        )
    if spec.head == "tied" or not has_output:
        return "token_embd.weight"
    return HEAD_RULE.name


def check_model(model: GGUFModel, architectures: Mapping[str, ArchSpec] | None = None) -> ModelReport:
    """Check ``model``'s metadata against its tensors; raise :class:`ModelConsistencyError`
    (or ConfigError for a bad key) naming the file and the key or tensor.

    Reads the header only: nothing is decoded, uploaded or allocated by the file's numbers."""
    table = ARCHITECTURES if architectures is None else architectures
    path = model.path
    names = set(model.tensors)
    cfg = config_from_metadata(model.metadata, path, names)
    spec = table.get(cfg.arch)
    if spec is None:
        raise _fail(path, f"architecture {cfg.arch!r} has no tensor rules (known: {', '.join(table)})")
    _check_layers(path, cfg.arch, cfg.n_layers, names)
    _check_vocab(path, model, cfg)
    head = _head(path, spec, cfg.arch, names)
    cfg = dataclasses.replace(cfg, tied_embeddings=head != HEAD_RULE.name)

    rules = list(spec.rules) + ([HEAD_RULE] if head == HEAD_RULE.name else [])
    dims = {k: f(cfg) for k, f in DIMS.items()}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        for i in range(cfg.n_layers) if rule.per_layer else (0,):
            name = rule.name.format(i=i)
            rec = model.tensors.get(name)
            if rec is None:
                if rule.required:
                    missing.append(name)
                continue
            used.add(name)
            want = tuple(dims[d] for d in rule.shape)
            if rec.shape != want:
                detail = ", ".join(f"{d}={dims[d]}" for d in rule.shape)
                raise _fail(path, f"tensor '{name}' has shape {rec.shape}, the config needs {want} ({detail})")
            if len(rec.shape) == 1 and rec.qtype not in FLOAT_TYPES:
                raise _fail(path, f"tensor '{name}' is a vector of type {rec.qtype.name}, not F32/F16/BF16")
    if missing:
        raise _fail(path, f"{len(missing)} tensor(s) the {cfg.arch} forward needs are missing: {_some(missing)}")
    unused = tuple(sorted(names - used))
    if unused:
        log.warning("%s: %d tensor(s) not used by the %s forward: %s", path, len(unused), cfg.arch, _some(list(unused)))
    return ModelReport(path, cfg, head, unused)


def open_checked(path: str | Path) -> tuple[GGUFModel, ModelReport]:
    """:func:`open_gguf` then :func:`check_model`: a well-formed *and* consistent file."""
    model = open_gguf(path)
    return model, check_model(model)
