"""Fused attention for the KV export: each decoder layer's attention core becomes ONE
``com.microsoft.GroupQueryAttention`` node (rotary inside it, from cos/sin cache initializers).

The exporter's own attention is about 60 nodes per layer (rotary, repeat_kv, the causal mask, the cache
Concat, Transposes); on int4 weights that plumbing took two thirds of decode time (docs/deploy.md). The
q/k/v/o projections stay the model's own Linear modules, so their MatMuls keep the name-scope metadata that
the matmul map, the structured rewrite and the quantizer read.

How: during tracing, each attention module's forward is swapped (``fused_attention``) for one that calls
the projections, then the torch custom op ``procrustes::gqa``. Its torch implementation is the reference
(the torch model stays exact); the ONNX translation (``TRANSLATION``) emits GroupQueryAttention.
``seqlens_k`` and ``total_sequence_length`` come once from the attention mask (``gqa_lengths``),
``query_seqlens`` from the new tokens (``query_lengths``).

Semantics are ORT's GroupQueryAttention without padding inside a row: tokens of row b are its first
``seqlens_k[b] + 1`` positions. Left-padded batches are refused by the runtime (``runtime.session``, which
reads the model metadata ``core.graph_io.ATTENTION_KEY``).
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

__all__ = ["ATTENTION_CHOICES", "TRANSLATION", "fused_attention", "gqa", "gqa_lengths", "graph_attention",
           "query_lengths", "rotary_caches", "check_fusable", "resolve_attention"]

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "gqa", "unfused")  # auto: gqa where the model's attention allows it


# -- the op: torch reference, fake shapes, ONNX translation -------------------------------------------------

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's non-interleaved rotary (rotate_half) on x [B, H, S, D] with cos/sin [B, 1, S, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("procrustes::gqa", mutates_args=())
def gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
        past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor, cos_cache: torch.Tensor,
        sin_cache: torch.Tensor, position_ids: torch.Tensor, query_seqlens: torch.Tensor, num_heads: int,
        kv_num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention (do_rotary=1, causal, no shared buffer): (out [B,S,Hq*D], present_k, present_v)."""
    batch, seq, _ = query.shape
    head = past_key.shape[-1]
    q = query.view(batch, seq, num_heads, head).transpose(1, 2)
    k = key.view(batch, seq, kv_num_heads, head).transpose(1, 2)
    v = value.view(batch, seq, kv_num_heads, head).transpose(1, 2)
    cos, sin = cos_cache[position_ids].unsqueeze(1), sin_cache[position_ids].unsqueeze(1)  # [B, 1, S, D/2]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    present_k, present_v = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)
    total = present_k.shape[2]
    groups = num_heads // kv_num_heads
    keys = present_k.repeat_interleave(groups, dim=1)
    values = present_v.repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [B, Hq, S, T]
    past = (seqlens_k.long() + 1 - seq).view(batch, 1, 1, 1)
    rows = torch.arange(seq).view(1, 1, seq, 1) + past
    cols = torch.arange(total).view(1, 1, 1, total)
    scores = scores.masked_fill(cols > rows, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # [B, Hq, S, D]
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head), present_k, present_v


@gqa.register_fake
def _gqa_fake(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
              position_ids, query_seqlens, num_heads, kv_num_heads, scale):
    batch, kv_heads, past, head = past_key.shape
    present = past_key.new_empty((batch, kv_heads, past + key.shape[1], head))
    return query.new_empty(query.shape), present, present.new_empty(present.shape)


def _gqa_schema():
    """An onnx OpSchema for the inputs/attributes used here: onnx has none for ORT's contrib op, and the
    exporter's evaluator needs one to build the node."""
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
             "k_norm_weight", "query_seqlens"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "P", "query_seqlens": "M"}
    inputs = [OpSchema.FormalParameter(n, types.get(n, "T"), param_option=opt if i else OpSchema.FormalParameterOption.Single)
              for i, n in enumerate(names)]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    constraints = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], ""),
                   ("P", ["tensor(int64)"], "")]
    attrs = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
             OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, "")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=constraints, attributes=attrs)


def _gqa_onnx(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
              position_ids, query_seqlens, num_heads: int, kv_num_heads: int, scale: float):
    """The translation: one com.microsoft GroupQueryAttention node."""
    from onnxscript.values import Op, Opset

    op = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    return op(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, position_ids,
              None, None, None, None, None, None, query_seqlens, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1)


TRANSLATION = {torch.ops.procrustes.gqa.default: _gqa_onnx}


def graph_attention(graph) -> str:
    """"gqa" if an onnx_ir graph holds GroupQueryAttention nodes, else "unfused"."""
    return "gqa" if any(n.op_type == "GroupQueryAttention" for n in graph) else "unfused"


# -- inputs computed once per step --------------------------------------------------------------------------

def gqa_lengths(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seqlens_k [B] int32, total_sequence_length scalar int32) from the [B, T] mask, as the builder does."""
    seqlens = (attention_mask.sum(dim=-1) - 1).to(torch.int32)
    total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
    return seqlens, total


def query_lengths(input_ids: torch.Tensor) -> torch.Tensor:
    """query_seqlens [B] int32: every new token is valid. Without it ORT's CPU kernel refuses a multi-token
    step after a past for batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context")."""
    return torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.int32)


def rotary_caches(rotary: nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, D/2] computed as HF's rotary module computes them (fp32, attention scaling)."""
    inv_freq = rotary.inv_freq.float()
    pos = torch.arange(positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return freqs.cos() * scaling, freqs.sin() * scaling


# -- the module swap -------------------------------------------------------------------------------------------

def _fused_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                   past_key_values=None, **kwargs):
    """LlamaAttention.forward with the core as procrustes::gqa; the cache layer gets the presents."""
    cache = cache if cache is not None else past_key_values
    lengths = kwargs["gqa_inputs"]
    layer = cache.layers[self.layer_idx]
    out, layer.keys, layer.values = torch.ops.procrustes.gqa(
        self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states), layer.keys,
        layer.values, *lengths, self.config.num_attention_heads, self.config.num_key_value_heads,
        float(self.scaling))
    return self.o_proj(out), None


_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq and scaling fixed at load: one cos/sin cache


def check_fusable(model: nn.Module) -> None:
    """Refuse, in one line, a model whose attention GroupQueryAttention cannot express exactly."""
    config = model.config
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    why = None
    if not attn or not all(hasattr(m, p) for m in attn for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        why = "its attention has no q/k/v/o projections"
    elif rotary is None or not hasattr(rotary, "inv_freq"):
        why = "it has no rotary embedding"
    elif any(hasattr(m, "q_norm") for m in attn):
        why = "its attention normalizes q and k (qk-norm)"
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        why = "it uses sliding-window attention"
    elif getattr(config, "attention_dropout", 0.0) or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        why = "its rotary or dropout settings differ from Llama's"
    elif getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
        why = f"its RoPE ({rotary.rope_type}) changes with the sequence length; fixed cos/sin caches cannot follow"
    if why:
        raise UserError(f"--attention gqa: cannot fuse {type(model).__name__} ({config.model_type}): {why}; "
                        "use --attention unfused")


def resolve_attention(model: nn.Module, attention: str, with_past: bool) -> str:
    """"gqa" or "unfused" for this model: "auto" fuses where ``check_fusable`` allows, "gqa" insists (a
    UserError otherwise); a graph without past is never fused (its attention has no cache to fuse with)."""
    if attention not in ATTENTION_CHOICES:
        raise UserError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    if not with_past or attention == "unfused":
        return "unfused"
    try:
        check_fusable(model)
    except UserError as exc:
        if attention == "gqa":
            raise
        logger.info("attention stays unfused: %s", exc)
        return "unfused"
    return "gqa"


@contextlib.contextmanager
def fused_attention(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Swap every attention forward for the fused one while inside; yields the cos/sin caches."""
    check_fusable(model)
    positions = int(getattr(model.config, "max_position_embeddings", 4096))
    caches = rotary_caches(model.model.rotary_emb, positions)
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    for m in attn:
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield caches
    finally:
        for m in attn:
            del m.forward
