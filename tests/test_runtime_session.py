"""Sessions: bad inputs are one-line UserErrors, CUDA falls back to CPU with a warning, options are applied."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.graph_io import decoder_feeds, empty_past, past_layout
from procrustes_onnx.runtime.session import OnnxCausalLM, create_session, providers_for
from test_runtime_helpers import tiny_artifact


def _foreign(path):
    """A valid ONNX graph that is not a causal LM: y = x + x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_missing_corrupt_and_foreign_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_session(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(UserError, match="cannot load") as exc:
        create_session(bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="not a causal-LM export"):
        OnnxCausalLM(_foreign(tmp_path / "add.onnx"))
    with pytest.raises(UserError, match="holds 0 .onnx files"):
        (tmp_path / "empty").mkdir()
        create_session(tmp_path / "empty")
    with pytest.raises(UserError, match="optimization level"):
        create_session(_foreign(tmp_path / "add.onnx"), opt_level="max")


def test_cuda_without_cuda_build_warns_and_falls_back(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.warns(RuntimeWarning, match="CUDA requested"):
        assert providers_for("cuda") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="unknown device"):
        providers_for("tpu")


def test_options_and_creation_time(tmp_path, tiny):
    lm = OnnxCausalLM(tiny.dir, threads=1, opt_level="basic")
    assert lm.info.threads == 1 and lm.info.opt_level == "basic" and lm.device == "cpu"
    assert lm.session.get_session_options().intra_op_num_threads == 1
    assert 0 < lm.create_seconds < 60
    assert lm.has_cache and len(lm.kv_names) == 2 * tiny.model.config.num_hidden_layers


@pytest.fixture(scope="module")
def tiny_unfused():
    """The tiny Llama exported with the exporter's own attention: the graph that takes left padding."""
    return tiny_artifact(attention="unfused")


def test_left_padded_batch_matches_unpadded_rows(tiny_unfused):
    """Left padding changes neither the logits nor the cached decode of the real tokens (rel. err < 1e-4);
    the fused-GQA graph refuses it (test_export_gqa)."""
    lm = OnnxCausalLM(tiny_unfused.onnx, threads=1)
    rng = np.random.default_rng(1)
    short, long = rng.integers(0, 256, size=(1, 4)), rng.integers(0, 256, size=(1, 7))
    ids = np.concatenate([np.concatenate([np.zeros((1, 3), np.int64), short], 1), long])
    mask = np.concatenate([np.concatenate([np.zeros((1, 3)), np.ones((1, 4))], 1), np.ones((1, 7))]).astype(np.int64)
    last, cache = lm.prefill(ids, mask)
    step, _ = lm.decode_step(np.array([5, 6]), cache)
    for row, seq in enumerate([short, long]):
        ref_last, ref_cache = lm.prefill(seq)
        ref_step, _ = lm.decode_step(np.array([5 + row]), ref_cache)
        scale = np.abs(ref_last).max()
        assert np.abs(last[row] - ref_last[0]).max() / scale < 1e-4
        assert np.abs(step[row] - ref_step[0]).max() / scale < 1e-4


@pytest.mark.gpu
def test_feeds_count_positions_past_padding_and_keep_only_graph_inputs(tiny):
    """The one feed builder: positions skip left padding across past and new tokens; no-past graphs get no past."""
    session = ort.InferenceSession(str(tiny.onnx), providers=["CPUExecutionProvider"])
    layout, dtype = past_layout(session.get_inputs(), str(tiny.onnx))
    assert len(layout) == 2 * tiny.model.config.num_hidden_layers and dtype == np.float32
    past = empty_past(layout, dtype, 2)
    feeds, mask = decoder_feeds({i.name for i in session.get_inputs()}, [[5, 6, 7], [8, 9, 10]], past,
                                np.array([[1, 1], [0, 1]]), np.array([[1, 1, 1], [1, 1, 1]]))
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert feeds["position_ids"].tolist() == [[2, 3, 4], [1, 2, 3]] and feeds["input_ids"].dtype == np.int64
    only, _ = decoder_feeds({"input_ids", "position_ids"}, np.ones((1, 4), np.int64), past)
    assert sorted(only) == ["input_ids", "position_ids"] and only["position_ids"].tolist() == [[0, 1, 2, 3]]
    with pytest.raises(UserError, match=r"\[batch, seq\]"):
        decoder_feeds({"input_ids"}, [1, 2, 3])


def test_cuda_iobinding_matches_cpu(tiny):
    """On a GPU machine with onnxruntime-gpu: the IOBinding path (KV cache on the device) equals CPU."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    cpu, gpu = OnnxCausalLM(tiny.onnx), OnnxCausalLM(tiny.onnx, device="cuda")
    assert gpu.device == "cuda"
    ids = np.random.default_rng(2).integers(0, 256, size=(2, 6))
    (a, ca), (b, cb) = cpu.prefill(ids), gpu.prefill(ids)
    for _ in range(3):
        a2, ca = cpu.decode_step(a.argmax(-1), ca)
        b2, cb = gpu.decode_step(a.argmax(-1), cb)
        assert np.abs(a2 - b2).max() / np.abs(a2).max() < 1e-3
        a, b = a2, b2
