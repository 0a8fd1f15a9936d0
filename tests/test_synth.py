"""teacher.synth and `q4k synth`: llama.cpp's Q4_K_M type mix, valid files, tokenizer, streaming."""

from __future__ import annotations

import hashlib
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from harness.cli import main as q4k_main
from teacher import synth
from teacher.gguf_file import open_gguf
from teacher.quants import dequantize
from teacher.synth import RECIPES, Recipe, plan_tensors, q4_k_m_type, use_more_bits, write_gguf

GIB = 2**30


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- llama.cpp's rules ------------------------------------------------------------------


def test_use_more_bits_matches_published_q4_k_m_files() -> None:
    # layers whose attn_v / ffn_down are Q6_K in the published Qwen2.5-7B-Instruct Q4_K_M
    assert {i for i in range(28) if use_more_bits(i, 28)} == {
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        24,
        25,
        26,
        27,
    }
    # Qwen2.5-0.5B (24 layers): first/last eighth plus every third layer in between
    assert {i for i in range(24) if use_more_bits(i, 24)} == {
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        21,
        22,
        23,
    }


@pytest.mark.parametrize(
    ("name", "shape", "has_output", "expect"),
    [
        ("blk.0.attn_norm.weight", (3584,), True, Q.F32),
        ("blk.0.attn_q.bias", (3584,), True, Q.F32),
        ("blk.3.attn_q.weight", (3584, 3584), True, Q.Q4_K),
        ("blk.3.attn_v.weight", (512, 3584), True, Q.Q4_K),
        ("blk.2.attn_v.weight", (512, 3584), True, Q.Q6_K),
        ("blk.27.ffn_down.weight", (3584, 18944), True, Q.Q6_K),
        ("blk.4.ffn_down.weight", (3584, 18944), True, Q.Q4_K),
        ("output.weight", (152064, 3584), True, Q.Q6_K),
        ("token_embd.weight", (152064, 3584), True, Q.Q4_K),
        ("token_embd.weight", (151936, 896), False, Q.Q8_0),  # tied, 896 % 256 != 0
        ("token_embd.weight", (2048, 256), False, Q.Q6_K),  # tied
        ("blk.3.attn_q.weight", (896, 896), False, Q.Q5_0),  # Q4_K fallback
        ("blk.0.attn_v.weight", (128, 896), False, Q.Q8_0),  # Q6_K fallback
        ("blk.3.ffn_up.weight", (4864, 80), False, Q.F16),  # not even a multiple of 32
    ],
)
def test_q4_k_m_type_rules(name: str, shape: tuple[int, ...], has_output: bool, expect: Q) -> None:
    n_layers = 24 if shape[-1] == 896 else 28
    assert q4_k_m_type(name, shape, n_layers, has_output) == expect


def _pattern(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "blk.N.", name)


def test_7b_shape_plan_matches_real_qwen2_5_7b_q4_k_m() -> None:
    plan = plan_tensors(RECIPES["qwen2.5-7b-shape"])
    assert len(plan) == 339  # as in the published file: 28 x 12 + 3
    shapes = {_pattern(t.name): t.shape for t in plan}
    assert shapes == {
        "token_embd.weight": (152064, 3584),
        "blk.N.attn_norm.weight": (3584,),
        "blk.N.attn_q.weight": (3584, 3584),
        "blk.N.attn_q.bias": (3584,),
        "blk.N.attn_k.weight": (512, 3584),
        "blk.N.attn_k.bias": (512,),
        "blk.N.attn_v.weight": (512, 3584),
        "blk.N.attn_v.bias": (512,),
        "blk.N.attn_output.weight": (3584, 3584),
        "blk.N.ffn_norm.weight": (3584,),
        "blk.N.ffn_gate.weight": (18944, 3584),
        "blk.N.ffn_up.weight": (18944, 3584),
        "blk.N.ffn_down.weight": (3584, 18944),
        "output_norm.weight": (3584,),
        "output.weight": (152064, 3584),
    }
    types: dict[str, set[Q]] = {}
    for t in plan:
        types.setdefault(_pattern(t.name), set()).add(t.qtype)
    assert types["token_embd.weight"] == {Q.Q4_K}
    assert types["output.weight"] == {Q.Q6_K}
    assert types["blk.N.attn_v.weight"] == types["blk.N.ffn_down.weight"] == {Q.Q4_K, Q.Q6_K}
    for k in (
        "attn_q.weight",
        "attn_k.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
    ):
        assert types[f"blk.N.{k}"] == {Q.Q4_K}
    assert all(t.qtype == Q.F32 for t in plan if len(t.shape) == 1)
    total = sum(t.nbytes for t in plan)
    assert abs(total / GIB - 4.36) / 4.36 < 0.05, total / GIB


def test_0_5b_shape_plan_follows_the_fallbacks() -> None:
    plan = {t.name: t for t in plan_tensors(RECIPES["qwen2.5-0.5b-shape"])}
    assert "output.weight" not in plan  # tied
    assert plan["token_embd.weight"].qtype == Q.Q8_0
    assert plan["blk.0.attn_q.weight"].qtype == Q.Q5_0
    assert plan["blk.0.attn_v.weight"].qtype == Q.Q8_0  # promoted Q6_K -> Q8_0
    assert plan["blk.3.attn_v.weight"].qtype == Q.Q5_0
    assert plan["blk.0.ffn_down.weight"].qtype == Q.Q6_K  # K = 4864 = 19 x 256
    assert plan["blk.3.ffn_down.weight"].qtype == Q.Q4_K
    assert plan["blk.0.ffn_down.weight"].shape == (896, 4864)


def test_recipe_validation() -> None:
    with pytest.raises(ValueError, match="divide"):
        Recipe("bad", "qwen2", hidden=256, layers=1, heads=3, kv_heads=1, ffn=256, vocab=300)
    with pytest.raises(ValueError, match="architecture"):
        Recipe("bad", "gpt2", hidden=256, layers=1, heads=4, kv_heads=1, ffn=256, vocab=300)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of 32"):
        Recipe("bad", "llama", hidden=256, layers=1, heads=4, kv_heads=1, ffn=100, vocab=300)


def test_new_architecture_recipes_plan_their_tensors() -> None:
    qwen3 = {t.name: t for t in plan_tensors(RECIPES["tiny-qwen3"])}
    assert qwen3["blk.1.attn_q_norm.weight"].shape == (64,) and "blk.0.attn_q.bias" not in qwen3
    assert qwen3["blk.0.attn_q.weight"].shape == (8 * 64, 256)  # key_length 64, not 256 / 8
    llama3 = plan_tensors(RECIPES["tiny-llama3"])
    assert llama3[0].name == "rope_freqs.weight" and llama3[0].shape == (32,)
    assert llama3[0].qtype == Q.F32 and "blk.0.attn_q_norm.weight" not in {t.name for t in llama3}


def test_llama3_rope_factors_match_transformers() -> None:
    """The factors the writer stores (llama.cpp's converter formula) against transformers'
    own llama3 RoPE init: inv_freq_default / inv_freq_llama3 = factor, per pair."""
    import torch

    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from teacher.synth import llama3_rope_factors

    r = RECIPES["tiny-llama3"]
    assert r.llama3_rope is not None
    factor, low, high, original = r.llama3_rope
    cfg = transformers.LlamaConfig(
        hidden_size=r.hidden, num_attention_heads=r.heads, head_dim=r.head_dim,
        rope_parameters={"rope_type": "llama3", "rope_theta": r.rope_theta, "factor": factor,
                         "low_freq_factor": low, "high_freq_factor": high,
                         "original_max_position_embeddings": original},
    )  # fmt: skip
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    inv = 1.0 / (r.rope_theta ** (np.arange(0, r.head_dim, 2) / r.head_dim))
    ours = llama3_rope_factors(r.head_dim, r.rope_theta, r.llama3_rope)
    np.testing.assert_allclose(ours, inv / inv_llama3.double().numpy(), rtol=1e-5)
    # the recipe's short original context puts most pairs in the scaled or smoothed bands
    assert (ours > 1).sum() >= len(ours) // 2 and ours.max() == pytest.approx(factor)


# -- written files ----------------------------------------------------------------------


def test_tiny_is_deterministic_valid_and_healthy(tmp_path: Path) -> None:
    a = write_gguf(RECIPES["tiny"], tmp_path / "a.gguf")
    b = write_gguf(RECIPES["tiny"], tmp_path / "b.gguf")
    assert sha256(a) == sha256(b)
    assert 1 << 20 < a.stat().st_size < 8 << 20
    m = open_gguf(a)
    assert m.architecture == "qwen2"
    md = m.metadata
    assert (
        md["qwen2.embedding_length"],
        md["qwen2.block_count"],
        md["qwen2.attention.head_count"],
    ) == (256, 2, 4)
    assert (md["qwen2.attention.head_count_kv"], md["qwen2.feed_forward_length"]) == (2, 512)
    assert len(md["tokenizer.ggml.tokens"]) == 2048 == m.tensor("token_embd.weight").shape[0]
    for name, t in {t.name: t for t in plan_tensors(RECIPES["tiny"])}.items():
        rec = m.tensor(name)
        assert (rec.shape, rec.qtype) == (t.shape, t.qtype)
        x = dequantize(rec.data, rec.qtype, rec.shape)
        assert np.isfinite(x).all()
        if t.kind == "weight":
            assert 0.018 < float(x.std()) < 0.022, name
        elif t.kind == "norm":
            assert abs(float(x.mean()) - 1.0) < 0.05, name
    other = write_gguf(replace(RECIPES["tiny"], seed=1), tmp_path / "c.gguf")
    assert sha256(other) != sha256(a)  # the seed is honoured


@pytest.mark.parametrize("hidden", [256, 160])  # 160: Q5_0/Q8_0 fallback blocks too
def test_random_blocks_are_valid_and_numerically_healthy(tmp_path: Path, hidden: int) -> None:
    r = Recipe("rb", "qwen2", hidden=hidden, layers=4, heads=4, kv_heads=2, ffn=512, vocab=1024,
               weights="random-blocks", seed=3)  # fmt: skip
    m = open_gguf(write_gguf(r, tmp_path / "rb.gguf"))
    seen = set()
    for t in plan_tensors(r):
        rec = m.tensor(t.name)
        seen.add(rec.qtype)
        x = dequantize(rec.data, rec.qtype, rec.shape)
        assert np.isfinite(x).all(), t.name
        if t.kind == "weight":
            assert 0.017 < float(x.std()) < 0.023, (t.name, rec.qtype.name, float(x.std()))
            assert abs(float(x.mean())) < 0.0005, (t.name, float(x.mean()))  # 0.025 std
    assert Q.Q6_K in seen and (Q.Q4_K in seen or hidden % 256)
    if hidden % 256:
        assert {Q.Q5_0, Q.Q8_0} <= seen


def test_writer_streams_instead_of_holding_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synth, "_SLAB_BYTES", 256 << 10)
    r = Recipe("mem", "llama", hidden=512, layers=2, heads=8, kv_heads=8, ffn=1024, vocab=32000,
               weights="random-blocks")  # fmt: skip
    largest = max(t.nbytes for t in plan_tensors(r))
    tracemalloc.start()
    try:
        p = write_gguf(r, tmp_path / "mem.gguf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.stat().st_size > 25 << 20
    assert peak < largest, (peak, largest)  # not even one whole tensor is held


def test_tokenizer_loads_in_transformers_and_round_trips(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    p = write_gguf(RECIPES["tiny"], tmp_path / "tiny.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=p.name)
    assert len(tok) == 2048
    texts = [
        "The capital of France is Paris.",
        "Hello, world! 2024 numbers: 3.14",
        "  leading spaces and\nnew lines\t tabs",
        "naïve café — 東京 🙂",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert all(0 <= i < 2048 for i in ids)
        assert tok.decode(ids) == text
    # merges were learned: common words are single tokens
    assert len(tok("The capital of France")["input_ids"]) <= 4
    eot = open_gguf(p).metadata["tokenizer.ggml.eos_token_id"]
    assert tok("<|endoftext|>")["input_ids"] == [eot]
    assert tok.eos_token == "<|endoftext|>"


def test_student_vocab_is_smaller_and_tied(tmp_path: Path) -> None:
    s = RECIPES["tiny-student"]
    assert s.vocab < RECIPES["tiny"].vocab and s.tied and s.arch == RECIPES["tiny"].arch
    m = open_gguf(write_gguf(s, tmp_path / "s.gguf"))
    assert "output.weight" not in m.tensors
    # both vocabularies share the byte alphabet and start the same way
    teacher_tokens = synth.build_vocab(RECIPES["tiny"].vocab)[0]
    assert m.metadata["tokenizer.ggml.tokens"][:256] == teacher_tokens[:256]


# -- the verb ----------------------------------------------------------------------------


def test_cmd_synth_writes_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.gguf"
    assert q4k_main(["synth", "tiny", "-o", str(out), "--no-progress"]) == 0
    assert sha256(out) == sha256(write_gguf(RECIPES["tiny"], tmp_path / "ref.gguf"))
    assert "wrote" in capsys.readouterr().out
    assert q4k_main(["synth", "tiny", "-o", str(out), "--no-progress"]) == 1  # exists, no --force
    assert q4k_main(["synth", "qwen2.5-7b-shape", "--plan"]) == 0
    plan_out = capsys.readouterr().out
    assert "output.weight" in plan_out and "Q6_K" in plan_out and "GiB" in plan_out


@pytest.mark.parametrize("size", [259, 2048, 152064])
def test_vocab_is_a_consistent_bpe(size: int) -> None:
    tokens, merges, types = synth.build_vocab(size)
    assert len(tokens) == len(types) == size and len(set(tokens)) == size
    index = {t: i for i, t in enumerate(tokens)}
    for m in merges:
        a, b = m.split(" ")
        # both parts exist before the result, as a BPE merge list requires
        assert index[a] < index[a + b] and index[b] < index[a + b], m
    assert [t for t, ty in zip(tokens, types, strict=True) if ty == 3] == list(synth.SPECIAL_TOKENS)
