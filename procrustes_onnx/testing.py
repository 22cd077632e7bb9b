"""Tiny random causal LMs built from configs, so tests and smoke runs never download anything."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from procrustes_onnx.compiler.config import CompressionConfig

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "tiny_model", "tiny_tokenizer", "save_tiny_model"]

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
