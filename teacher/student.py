"""The trainable student: a qwen2-family decoder in plain torch.

Architecture (what llama.cpp calls ``qwen2``): token embedding, per layer
RMSNorm -> GQA attention with q/k/v biases and NEOX-style RoPE -> residual ->
RMSNorm -> SwiGLU FFN -> residual, final RMSNorm, lm_head (optionally tied to
the embedding).

Parameters are always F32 (the "master weights"); AdamW keeps its state in the
parameters' dtype, so it is F32 too. On CUDA the forward runs under bf16
autocast (matmuls in bf16 on the tensor cores, reductions and the loss in F32),
which is where mixed precision pays; on CPU it stays F32 because bf16 matmuls
there are slower, not faster.

A student comes from a recipe (:data:`RECIPES`, or an inline spec such as
``qwen2:hidden=64,layers=2,heads=4,kv_heads=2,ffn=128,vocab=262144``) or from a
GGUF file, whose tensors are dequantized into trainable parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from teacher.kd_chunked import DeferredHeadGrad

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int
    max_context: int = 2048
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    arch: str = "qwen2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"student config: {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"student config: hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"student config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"student config: head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        if self.arch != "qwen2":
            raise ValueError(f"student config: only the qwen2 family is supported, got arch {self.arch!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"student config: unknown keys {unknown}")
        return cls(**dict(data))


# Named student shapes, the same as teacher/synth.py's recipes of those names
# (built here fresh and randomly initialised; pass the GGUF path to start from
# the file's weights instead). `qwen2.5-0.5b-shape` is Qwen2.5-0.5B's.
RECIPES: dict[str, StudentConfig] = {
    "qwen2.5-0.5b-shape": StudentConfig(
        vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        ffn_size=4864, max_context=32768, rope_theta=1_000_000.0, rms_eps=1e-6, tie_embeddings=True,
    ),
    "tiny-student": StudentConfig(
        vocab_size=1920, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
        ffn_size=256, max_context=512, rope_theta=1_000_000.0, rms_eps=1e-6, tie_embeddings=True,
    ),
}

_SPEC_KEYS = {
    "vocab": "vocab_size", "hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
    "kv_heads": "num_kv_heads", "ffn": "ffn_size", "ctx": "max_context", "rope_theta": "rope_theta",
    "eps": "rms_eps", "tied": "tie_embeddings",
}


def parse_recipe(spec: str) -> StudentConfig:
    """A named recipe, or ``qwen2:key=value,...`` (keys: vocab hidden layers heads kv_heads ffn ctx rope_theta eps tied)."""
    if spec in RECIPES:
        return RECIPES[spec]
    if not spec.startswith("qwen2:"):
        raise ValueError(
            f"unknown student recipe {spec!r}: use one of {sorted(RECIPES)} or "
            "'qwen2:vocab=V,hidden=H,layers=L,heads=N,kv_heads=K,ffn=F'"
        )
    values: dict[str, Any] = {"tie_embeddings": True}
    for part in filter(None, spec[len("qwen2:"):].split(",")):
        key, sep, raw = part.partition("=")
        if not sep or key.strip() not in _SPEC_KEYS:
            raise ValueError(f"student recipe {spec!r}: bad entry {part!r}; keys are {sorted(_SPEC_KEYS)}")
        field = _SPEC_KEYS[key.strip()]
        raw = raw.strip()
        try:
            if field in ("rope_theta", "rms_eps"):
                values[field] = float(raw)
            elif field == "tie_embeddings":
                values[field] = raw.lower() in ("1", "true", "yes")
            else:
                values[field] = int(raw)
        except ValueError:
            raise ValueError(f"student recipe {spec!r}: {key}={raw!r} is not a number") from None
    missing = [k for k, f in _SPEC_KEYS.items() if f not in values and f not in ("max_context", "rope_theta", "rms_eps", "tie_embeddings")]
    if missing:
        raise ValueError(f"student recipe {spec!r}: missing {missing}")
    return StudentConfig(**values)


# -- the model -----------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in F32 even under autocast (bf16 variance loses the small terms), in
        # one op: the layer-by-layer forward and backward of a 0.5B student at 8 x 512 are
        # bound by the host's launches, not by the GPU
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) [T, D] for :func:`apply_rope_neox`: the sine's first half is negated,
    which folds the rotation's minus sign into the table (exact: only a sign flips)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)  # [T, D/2]
    sin = ang.sin()
    ang = torch.cat([ang, ang], dim=-1)  # NEOX: the two halves share frequencies
    return ang.cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; NEOX style rotates the first half against the second (not interleaved
    pairs): x * cos + [-x2, x1] * sin, written as roll(x) times the signed sine table."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=True)
        self.k = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=True)
        self.v = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=True)
        self.o = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.cfg
        q = self.q(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope_neox(q, cos, sin), apply_rope_neox(k, cos, sin)
        rep = c.num_heads // c.num_kv_heads
        if rep > 1:  # GQA: each KV head serves `rep` query heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.ffn_norm(x))


class GradSink(list[Any]):
    """Shared by the tied lookup (``Student.forward(grad_sink=)``) and the loss
    (``fused_kd_loss(weight_sink=)``): the loss leaves the lm_head's gradient here, a
    dense tensor or a ``DeferredHeadGrad``. ``row_step(v0, grad_rows)``, when set,
    updates rows ``v0 : v0 + len(grad_rows)`` of the tied weight at once
    (``StepInBackward.row_step``): a deferred gradient is then never whole."""

    def __init__(self, row_step: Callable[[int, torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self.row_step = row_step


class _SinkEmbedding(torch.autograd.Function):
    """The embedding lookup whose backward adds its rows into a dense gradient a later
    consumer of the same (tied) weight left in ``sink``, and returns that one tensor.

    Autograd would otherwise hold the head's dense [vocab, hidden] gradient and the
    lookup's own dense one at once and add them into a third (a sparse lookup
    gradient does not help: dense + sparse is added out of place)."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, sink: list[Any]) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.sink = sink
        ctx.shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        (ids,) = ctx.saved_tensors
        sink: list[Any] = ctx.sink
        flat, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        # the head's gradient is there when the head ran after the lookup in this graph
        # (it always does: the hidden states it consumed come from here); else a zero one
        item = sink.pop() if sink else None
        if isinstance(item, DeferredHeadGrad):
            row_step = getattr(sink, "row_step", None)
            if row_step is None:
                item = item.dense()
            else:
                for v0, d in item.rows():
                    inside = ((flat >= v0) & (flat < v0 + d.shape[0])).unsqueeze(1)
                    # no host sync: a lookup row of another block adds zero to a clamped row of this one
                    d.index_add_(0, (flat - v0).clamp(0, d.shape[0] - 1), torch.where(inside, rows.to(d.dtype), 0.0))
                    row_step(v0, d)
                return None, None, None  # the weight is updated: autograd has no gradient to hand on
        dense = item if item is not None else torch.zeros(ctx.shape, dtype=grad_out.dtype, device=grad_out.device)
        dense.index_add_(0, flat, rows.to(dense.dtype))
        return None, dense, None


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # recompute each layer in backward instead of keeping its activations (and, under
        # autocast, its bf16 weight copies) from the forward: less memory for ~1/3 more compute
        self.checkpoint_layers = False
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    # scaled init on the residual outputs keeps deep stacks stable (GPT-2 style)
                    s = std / math.sqrt(2 * self.cfg.num_layers) if name.endswith(("o.weight", "down.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def forward(
        self, ids: torch.Tensor, hidden_only: bool = False, grad_sink: list[Any] | None = None
    ) -> torch.Tensor:
        """ids [B, T] int64 -> logits [B, T, vocab] (F32 even under autocast).

        ``hidden_only``: the final-norm hidden states [B, T, hidden] instead, for a
        loss that applies ``lm_head`` itself chunk by chunk (``teacher.kd_chunked``).
        A flag of forward rather than a second method: DDP prepares its gradient
        reduction in the wrapped module's forward.

        ``grad_sink`` (tied embeddings, a ``GradSink``): where that loss puts its lm_head
        gradient instead of returning it; the lookup's backward then adds its rows into
        it in place, so the tied weight's gradient exists once, not twice (or, deferred
        and with a ``row_step``, a block of rows at a time only)."""
        if ids.dim() != 2:
            raise ValueError(f"student input must be [B, T], got shape {tuple(ids.shape)}")
        t = ids.shape[1]
        if t > self.cfg.max_context:
            raise ValueError(f"sequence length {t} exceeds the student context {self.cfg.max_context}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {self.cfg.vocab_size}) for the student")
        if grad_sink is not None and self.cfg.tie_embeddings:
            x = _SinkEmbedding.apply(ids, self.embed.weight, grad_sink)
        else:
            x = self.embed(ids)
        cos, sin = rope_tables(t, self.cfg.head_dim, self.cfg.rope_theta, ids.device)
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        h = self.norm(x)
        return h if hidden_only else self.lm_head(h).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def autocast(device: torch.device | str, enabled: bool | None = None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (default on), nothing elsewhere (default off)."""
    dev = torch.device(device)
    if enabled is None:
        enabled = dev.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    # no weight-cast cache: each weight is used once per forward, so the cache saves no cast,
    # and it would keep every layer's bf16 copy alive until the context exits, defeating
    # layer checkpointing (which recasts one layer at a time in backward)
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, cache_enabled=False)


# -- GGUF names <-> parameters ----------------------------------------------------

_LAYER_MAP = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q.weight", "attn_q.bias": "attn.q.bias",
    "attn_k.weight": "attn.k.weight", "attn_k.bias": "attn.k.bias",
    "attn_v.weight": "attn.v.weight", "attn_v.bias": "attn.v.bias",
    "attn_output.weight": "attn.o.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight", "ffn_up.weight": "mlp.up.weight", "ffn_down.weight": "mlp.down.weight",
}


def gguf_name_map(cfg: StudentConfig) -> dict[str, str]:
    """GGUF tensor name -> student parameter name."""
    out = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        out["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        for g, p in _LAYER_MAP.items():
            out[f"blk.{i}.{g}"] = f"layers.{i}.{p}"
    return out


def student_spec_for(vocab: int, tokenizer_tokens: int, hidden: int, layers: int, ffn: int) -> str:
    """An inline recipe for a synthetic student paired with a teacher of these dims.

    Its vocab is smaller than the teacher's, as in the contracts' pairs: the
    tokenizer's token count where the lm_head is padded past it, else the
    teacher's vocab less 128 (152064 -> 151936, Qwen2.5-7B -> 0.5B). Its body is
    a quarter of the teacher's width and depth (a 7B shape gives hidden 896, 7
    layers), so memory claims still see a student of proportionate size."""
    v = tokenizer_tokens if 0 < tokenizer_tokens < vocab else max(1, vocab - 128)
    h = max(64, hidden // 4 // 64 * 64)
    heads = h // 64
    kv = 2 if heads % 2 == 0 else 1
    f = max(64, ffn // 4 // 32 * 32)
    return f"qwen2:vocab={v},hidden={h},layers={max(2, layers // 4)},heads={heads},kv_heads={kv},ffn={f}"


def config_from_model(mc: Any, tensor_names: set[str]) -> StudentConfig:
    """teacher.config.ModelConfig (read from GGUF metadata by the GGUF layer) -> StudentConfig."""
    if mc.arch != "qwen2":
        raise ValueError(f"a student can be initialised from a qwen2 GGUF only, this file is {mc.arch!r}")
    if mc.head_dim * mc.n_heads != mc.hidden or mc.rope_dim != mc.head_dim:
        raise ValueError(
            f"unsupported qwen2 geometry for a student: hidden {mc.hidden}, {mc.n_heads} heads of "
            f"{mc.head_dim}, rope dims {mc.rope_dim}"
        )
    return StudentConfig(
        vocab_size=int(mc.vocab_size), hidden_size=int(mc.hidden), num_layers=int(mc.n_layers),
        num_heads=int(mc.n_heads), num_kv_heads=int(mc.n_kv_heads), ffn_size=int(mc.ffn),
        max_context=int(mc.context), rope_theta=float(mc.rope_theta), rms_eps=float(mc.norm_eps),
        tie_embeddings="output.weight" not in tensor_names,
    )


def student_from_gguf(path: str | Path) -> Student:
    """Dequantize a qwen2 GGUF into a trainable F32 student (the vocab is the file's token count)."""
    from teacher.consistency import check_model
    from teacher.gguf_file import open_gguf  # colleagues' layer: validation + zero-copy tensors
    from teacher.quants import dequantize

    model = open_gguf(path)
    names = set(model.tensors)
    # metadata checked against the tensors before anything is dequantized
    cfg = config_from_model(check_model(model).config, names)
    student = Student(cfg, seed=None)
    params = dict(student.named_parameters())
    mapping = gguf_name_map(cfg)
    missing = [g for g in mapping if g not in names]
    if missing:
        raise ValueError(f"{path}: GGUF lacks student tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for gname, pname in mapping.items():
            rec = model.tensors[gname]
            arr = dequantize(rec.data, rec.qtype, rec.shape)
            t = torch.from_numpy(arr.reshape(rec.shape).copy()).float()
            if t.shape != params[pname].shape:
                raise ValueError(f"{path}: tensor {gname} has shape {tuple(t.shape)}, the student expects {tuple(params[pname].shape)}")
            params[pname].copy_(t)
    return student


def build_student(spec: str | Path, *, seed: int = 0) -> Student:
    """A recipe name / inline spec -> fresh student; an existing ``.gguf`` path -> dequantized student;
    a directory written by :func:`save_student` -> that student."""
    path = Path(spec)
    if str(spec).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"student GGUF {path} does not exist")
        return student_from_gguf(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_student(path)
    return Student(parse_recipe(str(spec)), seed=seed)


# -- save / load ------------------------------------------------------------------


def student_state(model: Student) -> dict[str, torch.Tensor]:
    """Parameters as contiguous CPU tensors; a tied lm_head is stored once (as the embedding)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_student(model: Student, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(student_state(model), str(tmp), metadata={"format": "pt", "arch": model.cfg.arch})
    tmp.replace(out / WEIGHTS_NAME)  # atomic: an interrupted save never leaves a torn file
    cfg_tmp = out / (CONFIG_NAME + ".tmp")
    cfg_tmp.write_text(json.dumps(model.cfg.to_json(), indent=2) + "\n")
    cfg_tmp.replace(out / CONFIG_NAME)
    return out


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    from safetensors.torch import load_file

    p = Path(path)
    cfg_file, w_file = p / CONFIG_NAME, p / WEIGHTS_NAME
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(f"{p} is not a saved student (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = StudentConfig.from_json(json.loads(cfg_file.read_text()))
    model = Student(cfg, seed=None)
    state = load_file(str(w_file))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_file}: missing tensors {missing}, unexpected tensors {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # load_state_dict copies; keep the tie
    return model.to(device)


def iter_trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    """Unique trainable parameters (a tied weight once)."""
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p
