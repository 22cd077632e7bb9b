import json
import math

import pytest
import torch

from procrustes_onnx.cli import main
from procrustes_onnx.compiler.checkpoint import load_model
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.sources import resolve_model_dir
from procrustes_onnx.core.texts import clean_paragraphs, load_text, tokenize_corpus
from procrustes_onnx.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def test_local_folder_loads_with_same_weights(tiny_dir):
    reference = tiny_model("llama")
    model, tokenizer = load_model(str(tiny_dir), tokenizer=False)
    assert tokenizer is None
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)  # eager vs sdpa attention


@pytest.mark.parametrize("spec, fragment", [
    ("no-such-alias", "unknown model"),
    ("/nonexistent/model.gguf", "not found"),
    ("someone/some-model", "offline"),
])
def test_bad_model_specs_are_one_line_user_errors(spec, fragment, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=fragment) as info:
        resolve_model_dir(spec)
    assert "\n" not in str(info.value)


def test_folder_without_tokenizer_is_user_error_when_one_is_needed(tiny_dir):
    with pytest.raises(UserError, match="no tokenizer"):
        load_model(str(tiny_dir))


def test_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UserError, match="not a causal LM"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_dir(str(tmp_path.parent))


def test_cli_exit_code_2_and_one_line(capsys, tmp_path):
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert main(["ppl", "--text", str(tmp_path / "missing.txt")]) == 2


def test_cli_info_json(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = tiny_model("llama")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert info["tied_embeddings"] is True
    assert info["parameters_by_kind"]["embedding"] == 256 * 64


def test_clean_paragraphs_rules():
    lines = ["  Title  ", "   ═════════  ", "", "a wrapped", "   line\there", "", "", "next", "----"]
    assert clean_paragraphs(lines) == "Title\n\na wrapped line here\n\nnext"


def test_text_file_source_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n")
    assert load_text(str(f)) == "hello world\n"
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UserError, match="not UTF-8"):
        load_text(str(tmp_path / "bin.txt"))
    with pytest.raises(UserError, match="neither"):
        load_text(str(tmp_path / "nope.txt"))


def test_jargon_cleaned_when_installed():
    from procrustes_onnx.core.texts import JARGON_PATH
    if not JARGON_PATH.is_file():
        pytest.skip("jargon-text not installed")
    text = load_text("jargon")
    assert text.startswith("The Jargon File") and "═" not in text and "\n\n\n" not in text


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) % 256 for c in text]}


def test_tokenize_corpus_has_no_bos_and_respects_limit():
    ids = tokenize_corpus(_CharTokenizer(), "abcdef", max_tokens=4)
    assert ids.tolist() == [97, 98, 99, 100]


@pytest.mark.slow
def test_embedded_smollm2_converts_and_loads():
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert math.isclose(sum(p.numel() for p in model.parameters()), 134_515_008, rel_tol=0)
    assert tokenizer("hello", add_special_tokens=False)["input_ids"]
