"""Forward-pass parity against an independent oracle: transformers loading the same GGUF.

Real published files (from their PyPI packages, nothing from a hub):
SmolLM2-135M-Instruct Q4_1 (llama, interleaved-pair RoPE after llama.cpp's Q/K
permutation) and Gemma-3-270M Q4_K_M (gemma3: QK-norm, sandwich norms, GeGLU,
scaled embeddings, local/global RoPE, sliding-window layers). A synthetic qwen2
file written here with ``gguf.GGUFWriter`` covers q/k/v biases and GQA, which
neither real model has.

Prediction: cosine >= 0.9999 and the same argmax at every position of every
prompt. Both sides dequantize to F32, so they should agree far closer than
transformers vs llama.cpp (0.998-0.9999, see docs/DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers (the oracle) is not installed"
)


COS_MIN = 0.9999  # issue 3, item 5

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at 100 degrees Celsius at sea level, but at high altitude it",
]

# long enough (> 512 tokens) that Gemma-3-270M's sliding-window layers (window 512)
# see a different context than its global layers
LONG_TEXT = (
    "In the spring of that year the river rose higher than anyone in the valley could "
    "remember. The miller moved his sacks of flour to the loft, the blacksmith let his "
    "forge go cold, and the children were sent to the old chapel on the hill, where the "
    "priest kept a ledger of every family and every animal they had brought with them. "
) * 8


# The real-model pairs (our DequantTeacher + transformers on the same file) are session
# fixtures in tests/conftest.py: loading them is most of this module's time, and
# tests/test_config.py compares against the same transformers objects.
from tests.conftest import Pair  # noqa: E402


def _check_prompt(pair: Pair, prompt: str, record: Any) -> None:
    assert pair.tok is not None
    ids = pair.tok(prompt).input_ids
    cos, ours, ref = pair.compare(ids)
    agree = ours.argmax(-1) == ref.argmax(-1)
    record("tokens", len(ids))
    record("cos_min", float(cos.min()))
    record("argmax_agreement", float(agree.float().mean()))
    print(
        f"\n{prompt[:40]!r}: {len(ids)} tokens, 1 - cos max {1 - float(cos.min()):.2e}, "
        f"argmax agree {int(agree.sum())}/{len(ids)}"
    )
    assert float(cos.min()) >= COS_MIN, f"cosine per position: {cos.tolist()}"
    assert bool(agree.all()), f"argmax differs at positions {(~agree).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gemma3_matches_transformers(gemma3: Pair, prompt: str, record_property: Any) -> None:
    _check_prompt(gemma3, prompt, record_property)


def test_gemma3_sliding_window_layers_match_transformers(
    gemma3: Pair, record_property: Any
) -> None:
    assert gemma3.tok is not None
    window = gemma3.teacher.cfg.sliding_window
    assert window is not None
    ids = gemma3.tok(LONG_TEXT).input_ids
    assert len(ids) > window + 16, "the prompt must reach past the sliding window"
    _check_prompt(gemma3, LONG_TEXT, record_property)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_matches_transformers(smollm2: Pair, prompt: str, record_property: Any) -> None:
    _check_prompt(smollm2, prompt, record_property)


def test_smollm2_greedy_continues_with_paris(smollm2: Pair) -> None:
    assert smollm2.tok is not None
    ids = smollm2.tok("The capital of France is").input_ids
    nxt = int(smollm2.teacher.logits_for_batch([ids])[0, -1].argmax())
    assert smollm2.tok.decode([nxt]) == " Paris"


def test_each_real_model_is_loaded_once_per_run(request: pytest.FixtureRequest) -> None:
    # not a performance claim: keeps the CI log honest about where the time goes
    models = request.getfixturevalue("real_models")
    pair = models.pair
    assert pair is not None
    print(f"\nDequantTeacher load of {models.name}: {pair.load_s:.1f}s; loads this session: {models.loads}")
    assert pair.teacher.cfg.arch == {"smollm2": "llama", "gemma3": "gemma3"}[models.name]
    assert len(models.loads) == len(set(models.loads)), models.loads


# -- qwen2: synthetic file, because neither real model has q/k/v biases ----------------


def _write_qwen2(path: Path, seed: int = 0) -> None:
    import gguf

    vocab, hidden, layers, heads, kv, ffn = 96, 64, 2, 4, 2, 128
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    wr = gguf.GGUFWriter(str(path), "qwen2")
    wr.add_block_count(layers)
    wr.add_context_length(256)
    wr.add_embedding_length(hidden)
    wr.add_feed_forward_length(ffn)
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_vocab_size(vocab)
    wr.add_tensor("token_embd.weight", w(vocab, hidden, scale=1.0))
    wr.add_tensor("output_norm.weight", 1.0 + w(hidden))
    wr.add_tensor("output.weight", w(vocab, hidden, scale=0.3))
    for i in range(layers):
        p = f"blk.{i}"
        wr.add_tensor(f"{p}.attn_norm.weight", 1.0 + w(hidden))
        wr.add_tensor(f"{p}.ffn_norm.weight", 1.0 + w(hidden))
        wr.add_tensor(f"{p}.attn_q.weight", w(heads * head_dim, hidden, scale=0.3))
        wr.add_tensor(f"{p}.attn_q.bias", w(heads * head_dim, scale=0.5))
        wr.add_tensor(f"{p}.attn_k.weight", w(kv * head_dim, hidden, scale=0.3))
        wr.add_tensor(f"{p}.attn_k.bias", w(kv * head_dim, scale=0.5))
        wr.add_tensor(f"{p}.attn_v.weight", w(kv * head_dim, hidden))
        wr.add_tensor(f"{p}.attn_v.bias", w(kv * head_dim, scale=0.5))
        wr.add_tensor(f"{p}.attn_output.weight", w(hidden, heads * head_dim))
        wr.add_tensor(f"{p}.ffn_gate.weight", w(ffn, hidden))
        wr.add_tensor(f"{p}.ffn_up.weight", w(ffn, hidden))
        wr.add_tensor(f"{p}.ffn_down.weight", w(hidden, ffn))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def test_qwen2_with_biases_matches_transformers(tmp_path: Path) -> None:
    path = tmp_path / "qwen2-synth.gguf"
    _write_qwen2(path)
    pair = Pair(path, tokenizer=False)
    assert pair.teacher.cfg.arch == "qwen2" and pair.teacher.ops.has("blk.0.attn_q.bias")
    ids = np.random.default_rng(1).integers(0, pair.teacher.vocab_size(), 48).tolist()
    cos, ours, ref = pair.compare(ids)
    assert float(cos.min()) >= COS_MIN, f"cosine per position: {cos.tolist()}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
