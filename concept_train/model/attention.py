"""Self-attention over a packed batch of variable-length sequences, with no work on padding.

All paths take q, k, v of shape [T, H, D] (T = real tokens of all sequences) and `cu_seqlens`
(int32 [S + 1]) and return [T, H, D]; they share the module's parameters, so a checkpoint loads
into any of them:

- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; the optional extra `flash`);
- `varlen`: PyTorch's native `torch.nn.attention.varlen.varlen_attn` (CUDA);
- `grouped`: the CPU / fallback path: sequences of equal length are gathered into one dense
  [n, H, L, D] block and go through `scaled_dot_product_attention` together, so no token ever
  attends to padding and no padding is computed.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _flash(q, k, v, cu, max_len, dropout_p):
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p)


def _native_varlen(q, k, v, cu, max_len):
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q, k, v, cu, cu, max_len, max_len)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """Exact attention within each sequence by grouping sequences of equal length."""
    T, H, D = q.shape
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    out = torch.empty_like(q)
    for length in torch.unique(lengths).tolist():
        starts = cu[:-1][lengths == length]
        idx = (starts[:, None] + torch.arange(length, device=q.device)[None, :]).reshape(-1)   # [n * L]
        n = len(starts)
        def block(x):   # noqa: E306 - [n*L, H, D] -> [n, H, L, D]
            return x.index_select(0, idx).view(n, length, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(block(q), block(k), block(v), dropout_p=dropout_p)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(n * length, H, D))
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Dispatch to the fastest correct path available for these tensors (see module docstring)."""
    if backend == "auto":
        if q.is_cuda and HAS_FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16):
            backend = "flash"
        elif q.is_cuda and dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16):
            backend = "varlen"
        else:
            backend = "grouped"
    if backend == "flash":
        return _flash(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    if backend == "varlen":
        return _native_varlen(q, k, v, cu_seqlens, max_seqlen)
    return grouped_attention(q, k, v, cu_seqlens, dropout_p)
