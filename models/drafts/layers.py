"""Layers every draft is built from: RMSNorm, rotate-half RoPE, the SwiGLU MLP, and the projections of
grouped-query attention. Weight names are the Llama/Qwen3 ones (`q_proj`, `gate_proj`, ...) that the
engines' draft classes load; each draft's attention pattern (DFlash's block over context keys, Eagle3's
training-time-test diagonal) lives in its own module, on top of `GroupedQueryProjections`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotate-half RoPE for integer positions: each [n, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., n, head_dim]; cos, sin: [n, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedQueryProjections(nn.Module):
    """The q/k/v/o projections of grouped-query attention over `in_dim`-wide inputs, with Qwen3's
    per-head RMSNorm on queries and keys when `qk_norm`. Subclasses define `forward`, the pattern."""

    def __init__(
        self,
        in_dim: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qk_norm: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(in_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """[..., n, n_heads * head_dim] -> [..., n_heads, n, head_dim]."""
        return x.unflatten(-1, (n_heads, self.head_dim)).transpose(-3, -2)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.heads(self.q_proj(x), self.num_heads)
        return self.q_norm(q) if self.qk_norm else q

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.heads(self.k_proj(x), self.num_kv_heads)
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        return (self.k_norm(k) if self.qk_norm else k), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """[..., heads, n, head_dim] -> o_proj of the heads side by side: [..., n, hidden]."""
        return self.o_proj(out.transpose(-3, -2).flatten(-2))
