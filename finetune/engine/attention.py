"""Attention of one new token per row over the KV cache, as the decode steps compute it (the eager
decoder and the compiled layer alike): our kernel (kernels/decode_attention.cpp) where it is built and
the model is fp32, so that a row's result does not depend on the batch it is decoded in; SDPA over the
cache plus the new token otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernel


def batch_invariant(like: torch.Tensor) -> bool:
    """Decode steps on tensors like this one (fp32, on a CPU) run through our kernel."""
    return like.dtype == torch.float32 and like.device.type == "cpu" and kernel.available()


def decode(
    q: torch.Tensor,  # [rows, 1, heads, head dim]
    past_k: torch.Tensor,  # [length, rows, kv heads, head dim], time-major as decoder.KV keeps it
    past_v: torch.Tensor,
    k: torch.Tensor,  # [rows, kv heads, head dim]: the new token's
    v: torch.Tensor,
    mask: torch.Tensor,  # [rows, length + 1], False on left padding
    scaling: float,
) -> torch.Tensor:
    """[rows, 1, heads x head dim]; the query heads share kv heads in groups (grouped-query attention)."""
    rows, _, heads, head_dim = q.shape
    if batch_invariant(q):
        flat = q.reshape(rows, heads, head_dim)
        return torch.ops.finetune.decode_attention(flat, past_k, past_v, k, v, mask, scaling).unsqueeze(1)
    # [rows, kv heads, length + 1, head dim] views of the time-major cache plus the new token
    all_k = torch.cat([past_k, k.unsqueeze(0)]).permute(1, 2, 0, 3)
    all_v = torch.cat([past_v, v.unsqueeze(0)]).permute(1, 2, 0, 3)
    a = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        all_k,
        all_v,
        attn_mask=mask[:, None, None, :],
        scale=scaling,
        enable_gqa=heads != k.shape[1],
    )
    return a.transpose(1, 2).reshape(rows, 1, -1)
