"""The student model: forward against transformers' Qwen2 (an independent oracle), save/load, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teacher.student import (
    RECIPES,
    Student,
    StudentConfig,
    build_student,
    iter_trainable,
    load_student,
    parse_recipe,
    save_student,
)

SMALL = StudentConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_size=48, max_context=64, rope_theta=10_000.0, tie_embeddings=False)


def _hf_qwen2(cfg: StudentConfig, student: Student) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_context,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="eager",
    )
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    ours = student.state_dict()
    mapping = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.num_layers):
        for hf_name, name in {
            "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn.q.weight", "self_attn.q_proj.bias": "attn.q.bias",
            "self_attn.k_proj.weight": "attn.k.weight", "self_attn.k_proj.bias": "attn.k.bias",
            "self_attn.v_proj.weight": "attn.v.weight", "self_attn.v_proj.bias": "attn.v.bias",
            "self_attn.o_proj.weight": "attn.o.weight", "mlp.gate_proj.weight": "mlp.gate.weight",
            "mlp.up_proj.weight": "mlp.up.weight", "mlp.down_proj.weight": "mlp.down.weight",
        }.items():
            mapping[f"model.layers.{i}.{hf_name}"] = f"layers.{i}.{name}"
    hf_state = {k: ours[v] for k, v in mapping.items()}
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_transformers_qwen2(tied: bool) -> None:
    cfg = StudentConfig(**{**SMALL.to_json(), "tie_embeddings": tied})
    student = Student(cfg, seed=3).eval()
    with torch.no_grad():  # non-zero biases and norms, so every term of the block is exercised
        for name, p in student.named_parameters():
            if name.endswith((".bias", "norm.weight")):
                p.add_(torch.randn(p.shape) * 0.1)
    hf = _hf_qwen2(cfg, student)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = student(ids)
        ref = hf(ids).logits
    assert ours.shape == (2, 17, cfg.vocab_size)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for cfg in (SMALL, RECIPES["tiny-student"]):
        student = Student(cfg, seed=1)
        out = save_student(student, tmp_path / str(cfg.tie_embeddings))
        tensors = load_file(str(out / "model.safetensors"))
        # a tied lm_head is stored once
        assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)
        assert json.loads((out / "config.json").read_text()) == cfg.to_json()
        back = load_student(out)
        assert back.cfg == cfg
        for (n1, a), (n2, b) in zip(student.state_dict().items(), back.state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(a, b), n1
        if cfg.tie_embeddings:
            assert back.lm_head.weight is back.embed.weight
        ids = torch.randint(0, cfg.vocab_size, (1, 8))
        assert torch.equal(student(ids), back(ids))


def test_load_rejects_incomplete_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved student"):
        load_student(tmp_path)


def test_tied_parameters_are_trained_once() -> None:
    student = Student(RECIPES["tiny-student"])
    params = list(iter_trainable(student))
    assert len(params) == len({id(p) for p in student.parameters()})
    assert sum(p.numel() for p in params) == student.num_parameters()


def test_inline_recipe_and_errors() -> None:
    cfg = parse_recipe("qwen2:vocab=262144,hidden=64,layers=2,heads=4,kv_heads=2,ffn=128")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_kv_heads) == (262144, 64, 2)
    with pytest.raises(ValueError, match="unknown student recipe"):
        parse_recipe("no-such-student")
    with pytest.raises(ValueError, match="missing"):
        parse_recipe("qwen2:vocab=10,hidden=8")
    with pytest.raises(ValueError, match="num_kv_heads"):
        parse_recipe("qwen2:vocab=10,hidden=12,layers=1,heads=3,kv_heads=2,ffn=8")
    assert RECIPES["qwen2.5-0.5b-shape"].vocab_size == 151936


def test_forward_rejects_out_of_vocab_ids() -> None:
    student = Student(SMALL)
    with pytest.raises(ValueError, match=r"token id 300 out of range \[0, 300\)"):
        student(torch.tensor([[1, 300]]))


def test_student_from_tiny_student_gguf() -> None:
    """Dequantizing a qwen2 GGUF into trainable weights gives the teacher forward's logits."""
    models = pytest.importorskip("teacher.models")
    pytest.importorskip("teacher.synth")
    from teacher.dequant_teacher import DequantTeacher

    path = models.resolve_model("tiny-student")
    student = build_student(str(path)).eval()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    ref = DequantTeacher.from_gguf(path)
    assert student.vocab_size == ref.vocab_size()
    ids = torch.randint(0, student.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = student(ids)
    torch.testing.assert_close(ours, ref.logits_for_batch(ids), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["tiny-student", "qwen2.5-0.5b-shape"])
def test_named_recipes_match_the_synthetic_model_shapes(name: str) -> None:
    synth = pytest.importorskip("teacher.synth")
    r = synth.RECIPES[name]
    ours = RECIPES[name]
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads,
            ours.ffn_size) == (r.vocab, r.hidden, r.layers, r.heads, r.kv_heads, r.ffn)
    assert ours.rope_theta == r.rope_theta
