"""Adapter for OPT: pre-LayerNorm with bias, learned positions, biases everywhere, mean-centred stream."""

from __future__ import annotations

from typing import Callable

from torch import nn

from procrustes_onnx.core.errors import UserError

from .base import ModelAdapter

__all__ = ["OPTAdapter"]


def _opt_shortcut_forward(self, hidden_states, attention_mask=None, use_cache=False, position_ids=None, **kwargs):
    """OPTDecoderLayer.forward (pre-LN) with the residual path multiplied by the skip matrices. The KV cache
    passes through ``kwargs`` under the name the model gave it (``past_key_values``, ``cache`` from
    transformers 5.25), so the attention never gets it twice."""
    residual = self.attn_shortcut(hidden_states)
    hidden_states = self.self_attn_layer_norm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_ids=position_ids,
                                      attention_mask=attention_mask, **kwargs)
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
    hidden_states = residual + hidden_states
    residual = self.mlp_shortcut(hidden_states)
    hidden_states = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
    return residual + hidden_states


class OPTAdapter(ModelAdapter):
    """OPT decoder (125m-style pre-LN). fc1 plays "up", fc2 plays "down"; there is no gate."""

    model_types = ("opt",)
    centres_stream = True
    embed_path = "model.decoder.embed_tokens"
    pos_embed_path = "model.decoder.embed_positions"
    embed_hook_path = "model.decoder.project_in"
    lm_head_path = "lm_head"
    final_norm_path = "model.decoder.final_layer_norm"
    layer_linears = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"}
    attn_norm_name = "self_attn_layer_norm"
    mlp_norm_name = "final_layer_norm"

    def validate(self) -> None:
        c = self.config
        if not getattr(c, "do_layer_norm_before", True):
            raise UserError("OPT with post-LayerNorm (do_layer_norm_before=False, e.g. opt-350m) is not supported; "
                            "use a pre-LN OPT such as opt-125m")
        if getattr(c, "word_embed_proj_dim", c.hidden_size) != c.hidden_size:
            raise UserError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported; "
                            "use an OPT whose embedding width equals hidden_size")
        if not getattr(c, "layer_norm_elementwise_affine", True):
            raise UserError("OPT without affine LayerNorms is not supported; use a standard OPT checkpoint")

    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def layer_path(self, i: int) -> str:
        return f"model.decoder.layers.{i}"

    def norm_params(self, norm: nn.Module) -> tuple:
        return norm.weight, norm.bias, float(norm.eps)

    def shortcut_forward(self) -> Callable:
        return _opt_shortcut_forward
