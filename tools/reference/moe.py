"""The MoE layer of MoE-LLaVA at inference, written from DeepSpeed 0.9.5 (`deepspeed/moe/sharded_moe.py`:
`TopKGate`, `top2gating`, `MOELayer`; `deepspeed/moe/layer.py`: `MoE`) — spec §4.

    logits = x.float() @ wg.float().T                       [S, E] fp32, no bias, no jitter
    gates  = softmax(logits)                                 fp32
    C      = max(ceil(f32(S/E) * f32(2*eval_capacity_factor)), min_capacity)   (_capacity: a python float
             times a float32 tensor, so the product is rounded to float32 before the ceil)
    i1     = argmax(gates)                                   first max on ties
    i2     = argmax((logits + noise) masked at i1)           DeepSpeed: noise = Gumbel(0,1), always
    loc1   = cumsum(mask1) - 1;  loc2 = cumsum(mask2) - 1 + sum(mask1)     per expert, token order
    keep k-th choice only where loc_k < C                    (capacity drop)
    w_k    = gate_k / max(g1 + g2, eps)                      renormalised after dropping
    y      = Σ_k w_k · Expert_{i_k}(x)

Modes: `noise=None` — deterministic top-2 (moellava's default); a tensor — the reference's sampled second
expert with that exact noise. `use_residual` (PR-MoE) is not used by any release and not implemented.
"""
import math

import numpy as np

import torch
import torch.nn as nn


def top2_routing(x: torch.Tensor, wg: torch.Tensor, capacity_factor: float, min_capacity: int, noise: torch.Tensor | None = None):
    """x [S, D] → (logits [S,E] fp32, idx [S,2] long, weights [S,2] fp32, kept [S,2] bool, capacity)."""
    logits = x.float() @ wg.float().t()
    gates = torch.softmax(logits, dim=1)
    s, e = gates.shape
    capacity = max(math.ceil(float(np.float32(np.float32(s / e) * np.float32(2 * capacity_factor)))), min_capacity)
    i1 = torch.argmax(gates, dim=1)
    mask1 = nn.functional.one_hot(i1, e)
    noisy = logits if noise is None else logits + noise.to(logits.dtype)
    i2 = torch.argmax(noisy.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = nn.functional.one_hot(i2, e)
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    keep1 = ((loc1 < capacity) & mask1.bool()).any(dim=1)
    keep2 = ((loc2 < capacity) & mask2.bool()).any(dim=1)
    g1 = gates.gather(1, i1[:, None]).squeeze(1) * keep1
    g2 = gates.gather(1, i2[:, None]).squeeze(1) * keep2
    denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
    weights = torch.stack([g1 / denom, g2 / denom], dim=1)
    return logits, torch.stack([i1, i2], dim=1), weights, torch.stack([keep1, keep2], dim=1), capacity


class MoE(nn.Module):
    """Drop-in for a decoder layer's `mlp`: the gate `wg` [E, D] and E copies of the family's MLP."""

    def __init__(self, wg: torch.Tensor, experts: list[nn.Module], capacity_factor: float, min_capacity: int):
        super().__init__()
        self.wg = nn.Parameter(wg, requires_grad=False)
        self.experts = nn.ModuleList(experts)
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.noise: torch.Tensor | None = None    # set per forward call for the sampled mode
        self.trace: list[dict] = []               # routing of every call, for the fixtures

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])                                        # [S, D], S = all tokens of this call
        noise = None if self.noise is None else self.noise[: x.shape[0]]
        logits, idx, w, kept, cap = top2_routing(x, self.wg, self.capacity_factor, self.min_capacity, noise)
        self.trace.append(dict(logits=logits.detach(), idx=idx, weights=w, kept=kept, capacity=cap))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            for k in range(2):
                rows = (idx[:, k] == e) & kept[:, k]
                if rows.any():
                    # DeepSpeed combines in the activation dtype: combine.type_as(x) · expert_out.
                    out[rows] += w[rows, k, None].to(x.dtype) * expert(x[rows])
        return out.reshape(shape)
