"""Artifact folders load in onnxruntime-genai and in transformers 4.x as well as 5.x.

genai_config.json is checked against config.json, generation_config.json and the graph's own I/O (no
onnxruntime-genai needed); with onnxruntime-genai installed (extra ``genai``), ``og.Model(folder)``
generates greedily the same ids as our ORT generator, for a dense export (untied head, so the random
model does not just repeat its last token), a structured rewrite with skip matrices and its int8 quantization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from procrustes_onnx.core.outputs import FILE_LIST
from procrustes_onnx.exporters import rewrite_structured_matmuls
from procrustes_onnx.exporters.genai_config import GENAI_CONFIG, genai_config
from procrustes_onnx.exporters.hf_compat import hf_compatible_files
from procrustes_onnx.exporters.pipeline import export_model
from procrustes_onnx.exporters.quantize import QuantizeConfig, quantize_artifact
from procrustes_onnx.runtime.generate import SamplingConfig, generate_ids
from procrustes_onnx.runtime.session import OnnxCausalLM
from procrustes_onnx.testing import save_tiny_model, tiny_tokenizer
from test_export_helpers import STRUCTURED_DIR, exported

ARCHS = ("llama", "qwen2")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    """arch -> dense export (with its byte tokenizer) of a tiny random model with an untied head."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"genai-{arch}")
        save_tiny_model(root / "hf", arch, tie=False)
        out[arch] = export_model(str(root / "hf"), root / "onnx").parent
    return out


def structured_folder() -> Path:
    _, _, _, path = exported("llama")
    return path.parent.parent / STRUCTURED_DIR


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """The structured folder quantized to int8 (MatMulNBits): a third folder writer."""
    return quantize_artifact(structured_folder(), tmp_path_factory.mktemp("q") / "int8",
                             QuantizeConfig(bits=8, block_size=16)).parent


def folders(dense: dict[str, Path], quantized: Path | None = None) -> dict[str, Path]:
    return {**dense, "structured": structured_folder(), "quantized": quantized}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _prompts(count: int = 3) -> list[list[int]]:
    return [[int(x) for x in np.random.default_rng(seed).integers(0, 256, 6)] for seed in range(count)]


@pytest.mark.parametrize("which", [*ARCHS, "structured", "quantized"])
def test_genai_config_matches_config_and_graph(which, dense, quantized):
    folder = folders(dense, quantized)[which]
    genai = _json(folder / GENAI_CONFIG)
    config, generation = _json(folder / "config.json"), _json(folder / "generation_config.json")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inputs = {v.name: v for v in graph.input}
    outputs = [v.name for v in graph.output]
    model, decoder = genai["model"], genai["model"]["decoder"]
    layers = config["num_hidden_layers"]
    assert model["type"] == config["model_type"] and decoder["filename"] == "model.onnx"
    assert (folder / decoder["filename"]).is_file()
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        assert decoder[key] == config[key], key
    assert decoder["head_size"] == config["hidden_size"] // config["num_attention_heads"]
    assert model["context_length"] == config["max_position_embeddings"]
    assert model["vocab_size"] == config["vocab_size"]
    assert model["eos_token_id"] == generation["eos_token_id"] and model["bos_token_id"] == generation["bos_token_id"]
    assert model["pad_token_id"] == generation["eos_token_id"]  # the tiny models have none: EOS, as in og's builder
    fused = any(n.op_type == "GroupQueryAttention" for n in graph.node)
    assert fused  # the default export (--attention auto) fuses Llama and Qwen2 attention
    assert genai["search"]["past_present_share_buffer"] is fused  # GQA writes into the shared buffer in place
    assert genai["search"]["do_sample"] is False and genai["search"]["num_beams"] == 1
    assert genai["search"]["max_length"] == config["max_position_embeddings"]
    names_in, names_out = decoder["inputs"], decoder["outputs"]
    assert {names_in[k] for k in ("input_ids", "attention_mask", "position_ids")} == \
        {"input_ids", "attention_mask", "position_ids"}
    past = {names_in[f"past_{kv}_names"] % i for kv in ("key", "value") for i in range(layers)}
    assert past | {"input_ids", "attention_mask", "position_ids"} == set(inputs)
    present = {names_out[f"present_{kv}_names"] % i for kv in ("key", "value") for i in range(layers)}
    assert [names_out["logits"]] + sorted(present) == [outputs[0]] + sorted(outputs[1:])
    shape = [d.dim_value for d in inputs[names_in["past_key_names"] % 0].type.tensor_type.shape.dim]
    assert (shape[1], shape[3]) == (decoder["num_key_value_heads"], decoder["head_size"])
    assert GENAI_CONFIG in _json(folder / FILE_LIST)["files"]


def test_generation_config_sets_search_and_eos_list(tmp_path, dense):
    """eos as a list, pad, sampling defaults and max_length come from generation_config.json when it sets them."""
    src = dense["llama"]
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, tmp_path / name)
    generation = {**_json(src / "generation_config.json"), "eos_token_id": [256, 7], "pad_token_id": 3,
                  "max_length": 64, "do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    genai = genai_config(tmp_path, ir.load(src / "model.onnx").graph)
    assert genai["model"]["eos_token_id"] == [256, 7] and genai["model"]["pad_token_id"] == 3
    assert genai["search"]["past_present_share_buffer"] is True  # the default export's fused GQA
    assert {k: genai["search"][k] for k in ("max_length", "do_sample", "temperature", "top_k", "top_p")} == \
        {"max_length": 64, "do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9}


def test_rewrite_regenerates_genai_config(tmp_path):
    """A dense-equivalent export without genai_config.json (written before it existed) gets one on rewrite,
    the same as a fresh export's."""
    _, _, factor_map, path = exported("llama")
    shutil.copytree(path.parent, tmp_path / "old")
    (tmp_path / "old" / GENAI_CONFIG).unlink()
    out = rewrite_structured_matmuls(tmp_path / "old", tmp_path / "rw", factor_map=factor_map).parent
    assert _json(out / GENAI_CONFIG) == _json(path.parent / GENAI_CONFIG) == _json(structured_folder() / GENAI_CONFIG)
    assert GENAI_CONFIG in _json(out / FILE_LIST)["files"]


def test_transformers_5_reads_the_compatible_files_as_before(dense):
    """tokenizer_config.json names a class transformers 4.x has, keeps token_type_ids out, and tokenizes
    exactly as the source tokenizer; config.json has 4.x's top-level rope_theta and loads unchanged in 5.x."""
    from transformers import AutoConfig, AutoTokenizer

    folder = dense["llama"]
    tok_config = _json(folder / "tokenizer_config.json")
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["model_input_names"] == ["input_ids", "attention_mask"]
    config = _json(folder / "config.json")
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    tok, source = AutoTokenizer.from_pretrained(folder), tiny_tokenizer()
    text = "Hello, world!\n\tDéjà vu <|endoftext|> 123"
    assert tok(text)["input_ids"] == source(text)["input_ids"]
    assert sorted(tok(text)) == ["attention_mask", "input_ids"]
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (source.bos_token, source.eos_token, source.unk_token)
    loaded = AutoConfig.from_pretrained(folder)
    assert loaded.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert hf_compatible_files(folder) == {"config.json": config, "tokenizer_config.json": tok_config}  # idempotent


def test_scaled_rope_is_written_for_transformers_4(tmp_path):
    """A llama3-scaled RoPE: 4.x's rope_scaling and rope_theta at the top level; 5.x reads the same
    rope_parameters from the rewritten config.json as from the original."""
    from transformers import AutoConfig, LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=1024,
                rope_parameters=rope).save_pretrained(tmp_path / "a")
    before = AutoConfig.from_pretrained(tmp_path / "a").rope_parameters
    new = hf_compatible_files(tmp_path / "a")["config.json"]
    assert new["rope_theta"] == 500000.0
    assert new["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(new))
    assert AutoConfig.from_pretrained(tmp_path / "b").rope_parameters == before


def _og_greedy(og, model, prompt: list[int], new_tokens: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("which", [*ARCHS, "structured", "quantized"])
def test_onnxruntime_genai_generates_our_greedy_ids(which, dense, quantized):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install '.[genai]')")
    folder = folders(dense, quantized)[which]
    eos = _json(folder / GENAI_CONFIG)["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    model, lm = og.Model(str(folder)), OnnxCausalLM(folder, threads=1)
    for prompt in _prompts():
        ours = generate_ids(lm, prompt, SamplingConfig(max_new_tokens=NEW_TOKENS), eos_ids=eos).token_ids
        assert _og_greedy(og, model, prompt, NEW_TOKENS) == ours
        assert len(set(ours)) > 2  # a real continuation, not one token repeated
