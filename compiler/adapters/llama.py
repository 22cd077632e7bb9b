"""Adapter for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2): RMSNorm, GQA, RoPE, tied or untied head."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .base import ModelAdapter

__all__ = ["LlamaAdapter"]


def _llama_shortcut_forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                            position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward with the residual path multiplied by the skip matrices. The KV cache passes
    through ``kwargs`` under the name the model gave it (``past_key_values``, ``cache`` from transformers 5.25)."""
    residual = self.attn_shortcut(hidden_states)
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    residual = self.mlp_shortcut(hidden_states)
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + hidden_states


class LlamaAdapter(ModelAdapter):
    """Llama-style decoder: q/k/v (Qwen2: with biases) and gate/up read, o/down write; RMSNorm gains only."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    embed_path = "model.embed_tokens"
    lm_head_path = "lm_head"
    final_norm_path = "model.norm"
    layer_linears = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    attn_norm_name = "input_layernorm"
    mlp_norm_name = "post_attention_layernorm"

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_path(self, i: int) -> str:
        return f"model.layers.{i}"

    def norm_params(self, norm: nn.Module) -> tuple:
        return norm.weight, None, float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def shortcut_forward(self) -> Callable:
        return _llama_shortcut_forward
