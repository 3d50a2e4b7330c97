"""Self-attention over a packed batch of variable-length sequences, with no work on padding.

All paths take q, k, v of shape [T, H, D] (T = real tokens of all sequences) and `cu_seqlens`
(int32 [S + 1]) and return [T, H, D]; they share the module's parameters, so a checkpoint loads
into any of them:

- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; the optional extra `flash`);
- `varlen`: PyTorch's native `torch.nn.attention.varlen.varlen_attn` (CUDA);
- `grouped`: the CPU / fallback path: sequences of equal length are gathered into one dense
  [n, H, L, D] block and go through `scaled_dot_product_attention` together, so no token ever
  attends to padding and no padding is computed. It is fastest on a batch whose sequences come
  in ascending length (`length_order`), which ContrastiveModel arranges once per forward.
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


def length_order(cu_seqlens: torch.Tensor):
    """How to reorder a packed batch so that its sequences come in ascending length (stable).

    Returns None when they already do; else (token_perm [T], sorted cu_seqlens, seq_order [S]):
    token i of the reordered batch is token token_perm[i] of the original, and sequence j of the
    reordered batch is sequence seq_order[j] of the original.
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    order = torch.argsort(lengths, stable=True)
    if bool((order[1:] > order[:-1]).all()):
        return None
    sorted_len = lengths[order]
    sorted_cu = torch.cat([cu[:1], torch.cumsum(sorted_len, 0)])
    # perm is a cumulative sum of steps: +1 within a sequence, a jump to the next sequence's start
    # at each boundary (repeat_interleave would do, but costs ~100x more on CPU)
    nonempty = sorted_len > 0
    first, starts, lens = sorted_cu[:-1][nonempty], cu[:-1][order][nonempty], sorted_len[nonempty]
    step = torch.ones(int(cu[-1]), dtype=torch.int64, device=cu.device)
    if len(starts):
        step[first[1:]] = starts[1:] - (starts[:-1] + lens[:-1]) + 1
        step[0] = starts[0]
    return torch.cumsum(step, 0), sorted_cu.to(cu_seqlens.dtype), order


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Exact attention within each sequence by grouping sequences of equal length.

    Sequences in ascending length order (ContrastiveModel sorts its input once per forward, see
    `length_order`) make each run of equal lengths a contiguous slice of q, k, v: `split` (no
    copy), one SDPA over an [n, H, L, D] block per distinct length, one `cat`. Otherwise q, k, v
    are first gathered into that order and the output gathered back. All of this costs O(T) in
    the backward pass too, whatever the number of distinct lengths; a gather per group from the
    full tensors would cost O(T) each in backward (O(groups x T) in all: measured 4x slower than
    a padded model on realistic CPU batches, tools/bench/model.py).
    """
    T, H, D = q.shape
    reorder = length_order(cu_seqlens)
    if reorder is not None:
        perm, cu_seqlens, _ = reorder
        q, k, v = q.index_select(0, perm), k.index_select(0, perm), v.index_select(0, perm)
    cu = cu_seqlens.to(torch.int64)
    uniq, counts = torch.unique_consecutive(cu[1:] - cu[:-1], return_counts=True)
    uniq, counts = uniq.tolist(), counts.tolist()
    sizes = [length * n for length, n in zip(uniq, counts)]
    outs = []
    for length, n, qs, ks, vs in zip(uniq, counts, q.split(sizes), k.split(sizes), v.split(sizes)):

        def block(x, n=n, length=length):  # noqa: E306 - [n*L, H, D] -> [n, H, L, D]
            return x.view(n, length, H, D).transpose(1, 2)

        o = F.scaled_dot_product_attention(block(qs), block(ks), block(vs), dropout_p=dropout_p)
        outs.append(o.transpose(1, 2).reshape(n * length, H, D))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out if reorder is None else out.index_select(0, inverse_permutation(reorder[0]))


def resolve_backend(backend: str, is_cuda: bool, dtype: torch.dtype, dropout_p: float = 0.0) -> str:
    """The path `auto` takes for tensors on this device and of this dtype (see module docstring)."""
    if backend != "auto":
        return backend
    half = is_cuda and dtype in (torch.float16, torch.bfloat16)
    if half and HAS_FLASH_ATTN:
        return "flash"
    if half and dropout_p == 0.0:
        return "varlen"
    return "grouped"


def varlen_attention(
    q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, backend: str = "auto"
) -> torch.Tensor:
    """Dispatch to the fastest correct path available for these tensors (see module docstring)."""
    backend = resolve_backend(backend, q.is_cuda, q.dtype, dropout_p)
    if backend == "flash":
        return _flash(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    if backend == "varlen":
        return _native_varlen(q, k, v, cu_seqlens, max_seqlen)
    return grouped_attention(q, k, v, cu_seqlens, dropout_p)
