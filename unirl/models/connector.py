"""The connector: LM hidden states at the query positions -> the DiT's caption features.

Variant (as the paper's code, BLIP3o/MetaQuery's "transformer down-projector"): ``n_layers`` pre-norm transformer
blocks at the LM width (RMSNorm -> bidirectional multi-head self-attention with per-head RMSNorm on q and k, no
positional encoding -> residual; RMSNorm -> SwiGLU MLP -> residual), then RMSNorm + Linear to the DiT's
``caption_channels``. Its output takes the place of SANA's text-encoder (Gemma) features: the DiT still applies its
own ``caption_projection`` (Linear-GELU-Linear) and ``caption_norm`` (RMSNorm) to it, exactly as it would to text
features. The CFG "unconditional" input is this output set to zero (see ``Conditioning.zeroed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden)
        self.w_up = nn.Linear(dim, hidden)
        self.w_down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class ConnectorAttention(nn.Module):
    """Bidirectional multi-head self-attention with RMSNorm on each head's queries and keys."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"connector width {dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).unbind(2)  # each (B, N, H, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        attn_mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, Dh)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class ConnectorBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = ConnectorAttention(dim, n_heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(mlp_ratio * dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class Connector(nn.Module):
    """(B, N, d_lm) query hidden states -> (B, N, d_caption) DiT conditioning."""

    def __init__(self, d_lm: int, d_caption: int, n_layers: int, n_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ConnectorBlock(d_lm, n_heads, mlp_ratio) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(d_lm, eps=1e-6)
        self.proj = nn.Linear(d_lm, d_caption)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden, key_mask)
        return self.proj(self.norm(hidden))
