"""Cross-attention and the spatial transformer that injects text context into the U-Net.

Key names (`to_q`, `ff.net.0.proj`, `proj_in`, ...) follow the original `ldm` code.

Attention itself, softmax(q k^T / sqrt(d)) v, has interchangeable backends that compute the same
numbers with different speed and memory; `set_attention_backend(model, name)` switches every layer
of a model that has an `attention_backend` attribute:

    sdpa      torch's scaled_dot_product_attention (default): picks a fused kernel per device
    xformers  xformers' memory-efficient kernel (CUDA only, optional dependency)
    sliced    the explicit formula, one (batch, head) and `slice_size` queries at a time: bounded memory
              wherever sdpa has no fused kernel and would build the whole score matrix
    math      the explicit formula with the whole (B, H, N, M) score matrix: a reference
"""

from __future__ import annotations

import importlib.util
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import InputError
from ldm.nn import Linear, zero_module

ATTENTION_BACKENDS = ("sdpa", "xformers", "sliced", "math")
# Queries per slice of "sliced" attention: 1024 x 4096 float32 scores (a 512 px SD image) are 16 MiB.
DEFAULT_SLICE_SIZE = 1024


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with q (..., N, d), k and v (..., M, d) -> (..., N, d).

    Scores and softmax are float32 whatever the input dtype: half-precision logits can overflow.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     slice_size: int = DEFAULT_SLICE_SIZE) -> torch.Tensor:
    """`math_attention` of q (B, H, N, d) over k, v (B, H, M, d), one (batch, head) pair and `slice_size`
    queries at a time, so that at most slice_size x M scores exist at once."""
    out = torch.empty_like(q)
    batch, heads, num_queries = q.shape[:3]
    for b, h, start in itertools.product(range(batch), range(heads), range(0, num_queries, slice_size)):
        rows = slice(start, start + slice_size)
        out[b, h, rows] = math_attention(q[b, h, rows], k[b, h], v[b, h])
    return out


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' memory-efficient attention of q (B, H, N, d) over k, v (B, H, M, d) on a CUDA device."""
    if not q.is_cuda:
        raise InputError(f"xformers attention runs on CUDA tensors only, these are on {q.device}: "
                         "use the sdpa backend")
    import xformers.ops  # optional dependency, imported only when asked for

    # xformers takes (B, N, H, d), the layout before the heads were split off.
    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              slice_size: int = DEFAULT_SLICE_SIZE) -> torch.Tensor:
    """Multi-head attention of q (B, H, N, d) over keys k and values v (B, H, M, d) -> (B, H, N, d)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "sliced":
        return sliced_attention(q, k, v, slice_size)
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "xformers":
        return xformers_attention(q, k, v)
    raise InputError(_unknown_backend(backend))


def _unknown_backend(backend: str) -> str:
    return f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"


def set_attention_backend(model: nn.Module, backend: str, slice_size: int = DEFAULT_SLICE_SIZE) -> int:
    """Make every attention layer of `model` (each module with an `attention_backend` attribute) use
    `backend`, one of ATTENTION_BACKENDS; `slice_size` is the queries per slice of "sliced".

    Returns the number of layers switched. Raises InputError for an unknown backend, or for xformers
    when it is not installed or the model is not on a CUDA device.
    """
    if backend not in ATTENTION_BACKENDS:
        raise InputError(_unknown_backend(backend))
    if slice_size < 1:
        raise InputError(f"attention slice size must be >= 1, got {slice_size}")
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise InputError("xformers is not installed (pip install xformers, CUDA only); use the sdpa backend")
        devices = {p.device for p in model.parameters() if not p.is_cuda}
        if devices:
            raise InputError(f"xformers attention runs on CUDA only, the model is on {devices.pop()}: "
                             "move it first or use the sdpa backend")
    layers = [m for m in model.modules() if hasattr(m, "attention_backend")]
    for layer in layers:
        layer.attention_backend = backend
        layer.attention_slice_size = slice_size
    return len(layers)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, N, C) over context (B, M, D); self-attention without context."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.attention_backend = "sdpa"  # see set_attention_backend
        self.attention_slice_size = DEFAULT_SLICE_SIZE

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, H, N, d)
        out = attention(q, k, v, self.attention_backend, self.attention_slice_size)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, H*d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear projection to twice the width, half of it gating the other half through GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hooks on proj (LoRA training's pairs) need proj's own call.
        hooked = self.proj._forward_hooks or self.proj._forward_pre_hooks
        if self.proj.uses_onednn(x) and not hooked:
            # Each half of the weight as its own matmul, GELU fused into the gate's and the product into the
            # value's: no (B, N, 2 * dim_out) intermediate, and two fewer passes over the activations.
            (weight, gate_weight), (bias, gate_bias) = self.proj.weight.chunk(2), self.proj.bias.chunk(2)
            gate = torch.ops.mkldnn._linear_pointwise(x, gate_weight, gate_bias, "gelu", [], "none")
            return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight, bias, "mul")
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x inner width."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, then feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: (B, C, h, w), context (B, M, D) -> (B, C, h, w).

    SD 1.x projects in and out with 1x1 convolutions, SD 2.x with linear layers (`use_linear`);
    the two are the same map but their weights are stored with different shapes.
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, context_dim: int,
                 depth: int = 1, use_linear: bool = False, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
            self.proj_out = zero_module(Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner_dim, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        # The residual first: an elementwise op takes its output layout from its first operand, and x is
        # an NHWC view here. An NHWC map would carry into every later block and make each conv reorder.
        return residual + x
