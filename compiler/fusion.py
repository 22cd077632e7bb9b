"""Norm fusion: fold norm gains/biases into the neighbouring linears so the model becomes rotation-invariant.

After `fuse_norms` every norm is a parameter-free RMSNorm, for which RMSN(x Q) = RMSN(x) Q for any
orthogonal Q. LayerNorm families (OPT) first get a zero-mean residual stream (SliceGPT's centring of
every writer), so LayerNorm equals RMSNorm on it. Tied heads keep the embedding stored once: the
final gain (and bias) become a small d x d matrix in front of the head (`HeadNorm.proj`).
"""

from __future__ import annotations

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .adapters import ModelAdapter, get_adapter, get_module, set_module, surgery_state

__all__ = ["RMSNorm", "HeadNorm", "Centring", "fuse_norms", "fuse_layer_norms", "fuse_final_norm", "install_fused_modules", "require_fused"]


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm, x / sqrt(sum(x^2)/dim + eps); `dim` stays the original width after slicing."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = int(dim), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x if x.dtype == torch.float64 else x.float()
        return (xc * torch.rsqrt(xc.pow(2).sum(-1, keepdim=True) / self.dim + self.eps)).to(x.dtype)


class HeadNorm(nn.Module):
    """Final norm of a tied model: RMSNorm, then the d x d matrix (gain, bias, rotations) before the tied head."""

    def __init__(self, dim: int, eps: float, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Centring(nn.Module):
    """x - (x . u) u / dim: removes the mean of a (rotated) token embedding; u = ones(d) Q_0."""

    def __init__(self, d: int, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.direction = nn.Parameter(torch.ones(d), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.direction.to(x.dtype)
        return x - (x @ u).unsqueeze(-1) * (u / self.dim)


def require_fused(model: nn.Module) -> None:
    """Raise a UserError unless `fuse_norms` has run on `model`."""
    if not surgery_state(model).get("fused"):
        raise UserError("the model's norms are not fused; call compiler.fusion.fuse_norms(model) first")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a parameter's data in its own dtype, keeping ties (value may change shape)."""
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def _fold_into_readers(model: nn.Module, norm: nn.Module, paths: list[str], adapter: ModelAdapter) -> None:
    """W_in <- diag(gain) W_in, b <- b + beta W_in for each reading linear."""
    gain, beta, _ = adapter.norm_params(norm)
    g = gain.detach().double()
    for path in paths:
        lin = get_module(model, path)
        w = lin.weight.detach().double()                     # out x d
        if beta is not None:
            shift = w @ beta.detach().double()
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype), requires_grad=False)
            _set(lin.bias, lin.bias.detach().double() + shift)
        _set(lin.weight, w * g)


def _centre_writers(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Make every write to the stream zero-mean (SliceGPT). Returns True if a Centring module was installed."""
    d = adapter.hidden_size
    installed = False
    for ref in adapter.embeddings():
        emb = get_module(model, ref.path)
        if ref.tied:   # the head shares the table: keep it, centre its lookup output instead
            set_module(model, adapter.embed_hook_path, Centring(d, d).to(emb.weight.dtype))
            installed = True
        else:
            w = emb.weight.detach().double()
            _set(emb.weight, w - w.mean(-1, keepdim=True))
    for i in range(adapter.num_layers):
        for ref in (adapter.attn_output(i), adapter.mlp_output(i)):
            lin = get_module(model, ref.path)
            w = lin.weight.detach().double()                 # d x in
            _set(lin.weight, w - w.mean(0, keepdim=True))
            if lin.bias is not None:
                b = lin.bias.detach().double()
                _set(lin.bias, b - b.mean())
    return installed


def fuse_layer_norms(model: nn.Module, adapter: ModelAdapter, i: int) -> float:
    """Fold decoder layer i's two norms into its readers (q/k/v, gate/up) and make them parameter-free;
    returns their eps. One layer's share of `fuse_norms`, so a streamed pass fuses each layer as it loads."""
    d, eps = adapter.hidden_size, 0.0
    for norm_path, refs in ((adapter.attn_norm_path(i), adapter.attn_inputs(i)),
                            (adapter.mlp_norm_path(i), adapter.mlp_inputs(i))):
        norm = get_module(model, norm_path)
        eps = adapter.norm_params(norm)[2]
        _fold_into_readers(model, norm, [r.path for r in refs], adapter)
        set_module(model, norm_path, RMSNorm(d, eps))
    return eps


def fuse_norms(model: nn.Module) -> nn.Module:
    """Fold every norm into its neighbours in place; logits are unchanged. Returns the model."""
    adapter = get_adapter(model)
    state = surgery_state(model)
    if state["fused"]:
        return model
    d = adapter.hidden_size
    with torch.no_grad():
        centring = _centre_writers(model, adapter) if adapter.centres_stream else False
        eps = None
        for i in range(adapter.num_layers):
            eps = fuse_layer_norms(model, adapter, i)
        tied, head_bias, final_eps = fuse_final_norm(model, adapter)
    state.update(fused=True, tied_head=tied, centring=centring, norm_dim=d, norm_eps=eps, final_norm_eps=final_eps,
                 head_bias=head_bias)
    return model


def fuse_final_norm(model: nn.Module, adapter: ModelAdapter) -> tuple[bool, bool, float]:
    """Fold the final norm: into the LM head, or for a tied head into a d x d `HeadNorm` in front of it
    (the shared table stays as it is). Returns (tied, the head has a bias, eps): the surgery record's."""
    d = adapter.hidden_size
    final = get_module(model, adapter.final_norm_path)
    gain, beta, final_eps = adapter.norm_params(final)
    tied = adapter.tied
    with torch.no_grad():
        if tied:
            head = HeadNorm(d, final_eps, d, d, bias=beta is not None).to(gain.dtype)
            _set(head.proj.weight, torch.diag(gain.detach().double()))
            if beta is not None:
                _set(head.proj.bias, beta.detach().double())
            set_module(model, adapter.final_norm_path, head)
        else:
            _fold_into_readers(model, final, [adapter.lm_head_path], adapter)
            set_module(model, adapter.final_norm_path, RMSNorm(d, final_eps))
    return tied, beta is not None, final_eps


def install_fused_modules(model: nn.Module) -> None:
    """Give a freshly built HF model the module layout of a fused one (placeholder weights), for loading."""
    adapter = get_adapter(model)
    state = surgery_state(model)
    d, dim = adapter.hidden_size, int(state["norm_dim"])
    for i in range(adapter.num_layers):
        for path in (adapter.attn_norm_path(i), adapter.mlp_norm_path(i)):
            set_module(model, path, RMSNorm(dim, state["norm_eps"]))
    if state["tied_head"]:
        set_module(model, adapter.final_norm_path,
                   HeadNorm(dim, state["final_norm_eps"], d, d, bias=bool(state.get("head_bias"))))
    else:
        set_module(model, adapter.final_norm_path, RMSNorm(dim, state["final_norm_eps"]))
    if state.get("centring"):
        set_module(model, adapter.embed_hook_path, Centring(d, dim))
