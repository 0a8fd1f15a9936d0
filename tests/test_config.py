"""teacher.config: GGUF metadata -> ModelConfig, and clear errors naming file and key."""

from __future__ import annotations

import math
from typing import Any

import pytest

from teacher.config import ConfigError, ModelConfig, config_from_metadata

LLAMA: dict[str, Any] = {
    "general.architecture": "llama",
    "llama.vocab_size": 49152,
    "llama.embedding_length": 576,
    "llama.block_count": 30,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.context_length": 8192,
    "llama.rope.freq_base": 100000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
}

GEMMA3: dict[str, Any] = {
    "general.architecture": "gemma3",
    "tokenizer.ggml.tokens": [f"t{i}" for i in range(300)],
    "gemma3.embedding_length": 640,
    "gemma3.block_count": 18,
    "gemma3.feed_forward_length": 2048,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.context_length": 32768,
    "gemma3.rope.freq_base": 1e6,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    "gemma3.attention.sliding_window": 512,
}

REQUIRED_LLAMA = [
    "general.architecture",
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.context_length",
    "llama.attention.layer_norm_rms_epsilon",
]


def test_llama() -> None:
    cfg = config_from_metadata(LLAMA, "m.gguf")
    assert (cfg.arch, cfg.vocab_size, cfg.hidden, cfg.n_layers) == ("llama", 49152, 576, 30)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn) == (9, 3, 64, 1536)
    assert cfg.rope_style == "normal" and cfg.rope_dim == 64 and cfg.rope_theta == 1e5
    assert cfg.context == 8192 and cfg.norm_eps == 1e-5 and not cfg.qkv_bias
    assert cfg.attn_scale == pytest.approx(1 / 8)
    assert not any(cfg.is_sliding(i) for i in range(cfg.n_layers))
    assert cfg.embed_scale == 1.0 and not cfg.qk_norm and not cfg.gelu_ffn


def test_qwen2_is_neox_with_biases() -> None:
    meta = {k.replace("llama.", "qwen2."): v for k, v in LLAMA.items()}
    meta["general.architecture"] = "qwen2"
    cfg = config_from_metadata(meta, "q.gguf")
    assert cfg.arch == "qwen2" and cfg.rope_style == "neox" and cfg.qkv_bias


def test_qwen3_has_qk_norm_no_biases_and_its_own_head_dim() -> None:
    meta = {k.replace("llama.", "qwen3."): v for k, v in LLAMA.items()}
    meta.update({"general.architecture": "qwen3", "qwen3.attention.key_length": 128,
                 "qwen3.attention.value_length": 128, "qwen3.rope.dimension_count": 128})  # fmt: skip
    cfg = config_from_metadata(meta, "q3.gguf")
    assert cfg.arch == "qwen3" and cfg.rope_style == "neox" and cfg.qk_norm and not cfg.qkv_bias
    assert cfg.head_dim == 128 != cfg.hidden // cfg.n_heads
    assert "attn_q_norm.weight" in cfg.spec.layer_tensors()
    assert "attn_q.bias" not in cfg.spec.layer_tensors()


def test_mistral_style_llama_slides_every_layer_only_with_the_key() -> None:
    assert not config_from_metadata(LLAMA, "m.gguf").is_sliding(0)
    cfg = config_from_metadata(
        {**LLAMA, "llama.attention.sliding_window": 4096, "llama.rope.scaling.type": "linear",
         "llama.rope.scaling.factor": 4.0}, "m.gguf")  # fmt: skip
    assert cfg.sliding_window == 4096
    assert all(cfg.is_sliding(i) for i in range(cfg.n_layers))
    # unlike gemma3's local layers, these keep the file's RoPE scaling
    assert {cfg.layer_rope_scale(i) for i in range(cfg.n_layers)} == {4.0}
    # a qwen2 file never reads the key (the table says which architectures do)
    meta = {k.replace("llama.", "qwen2."): v for k, v in LLAMA.items()}
    meta.update({"general.architecture": "qwen2", "qwen2.attention.sliding_window": 4096})
    assert config_from_metadata(meta, "q.gguf").sliding_window is None


def test_every_architecture_is_one_row_of_the_table() -> None:
    from teacher.config import ARCHS, SUPPORTED_ARCHS

    assert set(SUPPORTED_ARCHS) == set(ARCHS) == {"llama", "qwen2", "qwen3", "gemma3"}
    for name, spec in ARCHS.items():
        meta = {k.replace("llama.", f"{name}."): v for k, v in LLAMA.items()}
        meta["general.architecture"] = name
        if spec.sliding_window == "pattern":
            meta[f"{name}.attention.sliding_window"] = 512
        cfg = config_from_metadata(meta, f"{name}.gguf")
        assert (cfg.rope_style, cfg.qkv_bias, cfg.qk_norm) == (spec.rope_style, spec.qkv_bias, spec.qk_norm)
        assert (cfg.sandwich_norms, cfg.gelu_ffn) == (spec.sandwich_norms, spec.gelu_ffn)


def test_rope_freqs_only_in_llama_files() -> None:
    import torch

    from teacher.forward import hidden_states

    meta = {k.replace("llama.", "qwen3."): v for k, v in LLAMA.items()}
    meta["general.architecture"] = "qwen3"
    cfg = config_from_metadata(meta, "q3.gguf")

    class Ops:
        dtype = torch.float32

        def has(self, name: str) -> bool:
            return name == "rope_freqs.weight"

        def vector(self, name: str) -> torch.Tensor:
            return torch.ones(cfg.rope_dim // 2)

    with pytest.raises(ValueError, match=r"rope_freqs\.weight in a qwen3 file"):
        hidden_states(cfg, Ops(), torch.zeros((1, 4), dtype=torch.long))  # type: ignore[arg-type]


def test_gemma3() -> None:
    cfg = config_from_metadata(GEMMA3, "g.gguf")
    assert cfg.vocab_size == 300  # from the tokenizer tokens: no gemma3.vocab_size
    assert cfg.head_dim == 256 and cfg.hidden == 640 and cfg.n_kv_heads == 1
    assert cfg.rope_style == "neox" and cfg.rope_theta == 1e6 and cfg.rope_theta_local == 1e4
    assert cfg.embed_scale == pytest.approx(math.sqrt(640))
    assert cfg.attn_scale == pytest.approx(256**-0.5)
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.gelu_ffn and cfg.sliding_window == 512
    assert [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert cfg.layer_rope_theta(0) == 1e4 and cfg.layer_rope_theta(5) == 1e6


def test_gemma3_27b_query_scale() -> None:
    meta = {**GEMMA3, "gemma3.block_count": 62, "gemma3.embedding_length": 5376}
    meta["gemma3.attention.head_count"] = 32
    meta["gemma3.attention.head_count_kv"] = 16
    meta["gemma3.attention.key_length"] = meta["gemma3.attention.value_length"] = 128
    cfg = config_from_metadata(meta, "g27.gguf")
    assert cfg.attn_scale == pytest.approx((5376 / 32) ** -0.5)  # llama.cpp's 27B special case


def test_vocab_size_key_wins_over_tokens() -> None:
    cfg = config_from_metadata({**LLAMA, "tokenizer.ggml.tokens": ["a", "b"]}, "m.gguf")
    assert cfg.vocab_size == 49152
    meta = {k: v for k, v in LLAMA.items() if k != "llama.vocab_size"}
    assert config_from_metadata({**meta, "tokenizer.ggml.tokens": ["a", "b"]}, "m").vocab_size == 2


def test_tied_embeddings_from_tensor_names() -> None:
    assert config_from_metadata(LLAMA, "m").tied_embeddings is None
    assert config_from_metadata(LLAMA, "m", ["token_embd.weight"]).tied_embeddings is True
    names = ["token_embd.weight", "output.weight"]
    assert config_from_metadata(LLAMA, "m", names).tied_embeddings is False


def test_numpy_and_one_element_values() -> None:
    np = pytest.importorskip("numpy")
    meta = {**LLAMA, "llama.block_count": np.uint32(30), "llama.rope.freq_base": [np.float32(1e5)]}
    cfg = config_from_metadata(meta, "m")
    assert cfg.n_layers == 30 and isinstance(cfg.n_layers, int) and cfg.rope_theta == 1e5


@pytest.mark.parametrize("key", REQUIRED_LLAMA)
def test_missing_key_names_file_and_key(key: str) -> None:
    meta = {k: v for k, v in LLAMA.items() if k != key}
    with pytest.raises(ConfigError) as exc:
        config_from_metadata(meta, "/models/x.gguf")
    assert "/models/x.gguf" in str(exc.value) and key in str(exc.value)


def test_missing_vocab_names_both_sources() -> None:
    meta = {k: v for k, v in LLAMA.items() if k != "llama.vocab_size"}
    with pytest.raises(ConfigError, match=r"x\.gguf.*llama\.vocab_size.*tokenizer\.ggml\.tokens"):
        config_from_metadata(meta, "x.gguf")


def test_gemma3_without_sliding_window_is_an_error() -> None:
    meta = {k: v for k, v in GEMMA3.items() if k != "gemma3.attention.sliding_window"}
    with pytest.raises(ConfigError, match=r"gemma3\.attention\.sliding_window"):
        config_from_metadata(meta, "g.gguf")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"general.architecture": "mamba"}, "not supported"),
        ({"llama.attention.head_count_kv": 2}, "not a multiple"),
        ({"llama.block_count": 0}, "positive"),
        ({"llama.block_count": 2.5}, "integer"),
        ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, "finite"),
        ({"llama.rope.scaling.type": "yarn"}, "not supported"),
        ({"llama.rope.dimension_count": 65}, "even"),
    ],
)
def test_bad_values(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        config_from_metadata({**LLAMA, **change}, "bad.gguf")
    assert "bad.gguf" in str(exc.value)


def test_linear_rope_scaling_only_on_global_layers() -> None:
    meta = {**GEMMA3, "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    cfg = config_from_metadata(meta, "g")
    assert cfg.layer_rope_scale(5) == 8.0 and cfg.layer_rope_scale(0) == 1.0


def test_frozen() -> None:
    cfg = config_from_metadata(LLAMA, "m")
    assert isinstance(cfg, ModelConfig)
    with pytest.raises(AttributeError):
        cfg.hidden = 1  # type: ignore[misc]


# -- the real files, against transformers' own reading of the same metadata ---------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.real_model(n)) for n in ("smollm2", "gemma3")])
def test_real_files_agree_with_transformers(name: str, request: pytest.FixtureRequest) -> None:
    from teacher.gguf_file import open_gguf

    # the session's transformers model of the same file (tests/conftest.py): its config is
    # transformers' own reading of the GGUF metadata, and the model is loaded only once
    pair = request.getfixturevalue(name)
    cfg = open_gguf(pair.path).config
    hf = pair.hf.config
    assert cfg.vocab_size == hf.vocab_size
    assert cfg.hidden == hf.hidden_size and cfg.n_layers == hf.num_hidden_layers
    assert cfg.n_heads == hf.num_attention_heads and cfg.n_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert cfg.ffn == hf.intermediate_size and cfg.context == hf.max_position_embeddings
    assert cfg.norm_eps == pytest.approx(hf.rms_norm_eps)
    if name == "gemma3":
        assert cfg.sliding_window == hf.sliding_window
        layer_types = [
            "sliding_attention" if cfg.is_sliding(i) else "full_attention"
            for i in range(cfg.n_layers)
        ]
        assert layer_types == list(hf.layer_types)
        assert cfg.attn_scale == pytest.approx(hf.query_pre_attn_scalar**-0.5)
        rope = hf.rope_parameters
        assert cfg.rope_theta == rope["full_attention"]["rope_theta"]
        assert cfg.rope_theta_local == rope["sliding_attention"]["rope_theta"]
    else:
        rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
        assert cfg.rope_theta == rope["rope_theta"]
