"""Tiny random causal LMs built from configs, so tests and smoke runs never download anything."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from procrustes_onnx.compiler.config import CompressionConfig

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "tiny_model", "tiny_tokenizer", "save_tiny_model", "peak_rss_growth_kib",
           "STREAM_SETUP", "STREAM_WORK"]

TINY_ARCHITECTURES = ("llama", "qwen2", "opt")


def tiny_config(arch: str = "llama", *, hidden: int = 64, layers: int = 2, vocab: int = 256,
                tie: bool = True, max_positions: int = 512) -> PretrainedConfig:
    """A config small enough to build in milliseconds but with every feature the adapters must handle
    (GQA, tied embeddings, Qwen2's q/k/v biases, OPT's LayerNorm with bias)."""
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + hidden // 2,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + hidden // 2,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                         tie_word_embeddings=tie, do_layer_norm_before=True, enable_bias=True)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    """A randomly initialised model whose norms are perturbed away from 1 so norm fusion is really tested."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **kw)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <|endoftext|> = id 256), built offline in milliseconds."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def save_tiny_model(path, arch: str = "llama", **kw):
    """A tiny random model plus its byte tokenizer, saved as a Hugging Face folder (a stand-in for a real one)."""
    kw.setdefault("vocab", 264)
    kw.setdefault("max_positions", 1100)  # room for the protocol's 1024-token windows
    model = tiny_model(arch, **kw)
    model.config.eos_token_id = model.config.bos_token_id = 256
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = 256
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how tests compare a result with its dense reference."""
    return float((a - b).norm() / b.norm())


def tiny_compression_config(**overrides):
    """A CompressionConfig cheap enough for tiny models in tests (weighted, 3/4 kept, short solves)."""
    base = dict(ratio=None, preset="3/4", method="weighted", iterations=5, rotation_iters=20, calib_samples=4,
                calib_seq_len=32)
    base.update(overrides)
    return CompressionConfig(**base)


_PEAK_PREAMBLE = """
import json, sys, torch
torch.set_num_threads(1)
def _status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
"""

_PEAK_RESET = """
with open("/proc/self/clear_refs", "w") as _f:
    _f.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' transient peaks do not count
_base = _status("VmRSS")
"""

_PEAK_REPORT = """
print(json.dumps({"growth_kib": _status("VmHWM") - _base}))
"""


def peak_rss_growth_kib(setup: str, work: str, *args: str) -> int:
    """Peak resident memory (Linux VmHWM, KiB) that the Python code ``work`` adds in a fresh process, over
    the resident set once ``setup`` (imports, inputs) has run; ``sys.argv[1:]`` there is ``args``. A memory
    bound measured as a ratio of such numbers does not depend on the machine's speed."""
    import json
    import subprocess
    import sys
    import textwrap

    code = _PEAK_PREAMBLE + textwrap.dedent(setup) + _PEAK_RESET + textwrap.dedent(work) + _PEAK_REPORT
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp", "HF_HUB_OFFLINE": "1"})
    return int(json.loads(done.stdout.strip().splitlines()[-1])["growth_kib"])


#: `peak_rss_growth_kib` code for one compression of the folder sys.argv[1] into sys.argv[2], streamed or in
#: memory (cheap solver settings: the memory, not the result, is measured); tests and benchmarks/stream_memory.py
STREAM_SETUP = """
from transformers import AutoModelForCausalLM
from procrustes_onnx.compiler.compress import compress
from procrustes_onnx.compiler.streamed import compress_streamed
from procrustes_onnx.testing import tiny_compression_config
folder, out = sys.argv[1:3]
cfg = tiny_compression_config(rotation="per-position", structure="gs", method="weighted", iterations=1,
                              rotation_iters=2, weighted_outer=1, calib_samples=4, calib_seq_len=64)
glob = tiny_compression_config(rotation="global", structure="gs", method="weighted", iterations=1,
                               rotation_iters=2, weighted_outer=1, calib_samples=4, calib_seq_len=64)
calib = torch.arange(4000) % 256
quiet = lambda s: None
"""
STREAM_WORK = {
    "stream": "compress_streamed(folder, None, cfg, out, echo=quiet, calib_tokens=calib)\n",
    "stream-global": "compress_streamed(folder, None, glob, out, echo=quiet, calib_tokens=calib)\n",
    "memory": """
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
compress(model, None, cfg, out, progress=False, echo=quiet, calib_tokens=calib)
"""}
