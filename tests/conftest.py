import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch



def pytest_collection_modifyitems(config, items):
    """Real-model tests are opt-in (PROCRUSTES_SLOW=1); GPU tests skip cleanly without CUDA."""
    slow = os.environ.get("PROCRUSTES_SLOW") == "1"
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="real-model test; set PROCRUSTES_SLOW=1"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


@pytest.fixture(scope="session", autouse=True)
def _scratch_under_basetemp(tmp_path_factory):
    """The session-cached helpers (exported, tiny_artifact, build_inputs, the mutants) and libraries make
    their scratch with tempfile outside any test's tmp_path: point tempfile at pytest's basetemp, so the
    suite leaves nothing in the system temp folder even when a helper's cleanup never runs."""
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = old


@pytest.fixture(scope="session")
def tiny():
    """A tiny Llama with a byte tokenizer, exported once per session with its KV cache (test_runtime_helpers)."""
    from test_runtime_helpers import tiny_artifact

    return tiny_artifact()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Keep every test's model cache out of the user's home."""
    if "PROCRUSTES_ONNX_CACHE" not in os.environ:
        monkeypatch.setenv("PROCRUSTES_ONNX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny-model tests are dominated by dispatch, not FLOPs: one thread avoids OpenMP stalls on shared
    cores. Restored after each test, since code under test may change it (e.g. the pipeline's --threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
