"""Keyed pseudo-random permutations of range(n), evaluated index by index in O(1) memory.

`mixed` batching shuffles every cell of a species each epoch. Materialising that permutation costs
12 bytes per cell and a stall at every epoch start (1.3 GB and 4 s at 30M cells, in every process
that makes batches); here position p of the shuffled order is computed on demand instead, so a
batch costs O(batch size) and resuming at batch g still needs nothing but g.

The permutation is a Feistel network over the smallest domain of 2^b >= n indices, with
cycle-walking (an index that lands outside range(n) is enciphered again until it lands inside):
a bijection on range(n) for any round function. Domains are below 2n, so the expected walk is
under 2 steps. The round function is splitmix64's finaliser over the half-block and a
round key; keys are 64-bit integers derived from (seed, ...) by `key_of`. It is not a
cryptographic cipher: it only has to mix well and be the same on every machine (pure uint64
arithmetic, no platform-dependent generator). splitmix64 is written here once; the view filters'
per-token hash (filters.py) imports it.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2^64 / the golden ratio


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 in, uint64 out; wraps modulo 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 step from state `x`: the increment added, then the finaliser (the view
    filters' per-token hash, filters.py)."""
    return mix(x + GOLDEN)


def key_of(*parts) -> np.ndarray:
    """64-bit keys from non-negative integers or integer arrays (seed, epoch, file, ...),
    order-sensitive; arrays broadcast, so one call keys every cell of a batch."""
    with np.errstate(over="ignore"):
        k = np.uint64(0x6A09E667F3BCC909)
        for part in parts:
            k = mix(k ^ (np.asarray(part).astype(np.uint64) + GOLDEN))
        return k


def permute(positions, n, key) -> np.ndarray:
    """Element i of the result: where position positions[i] of range(n[i]) goes under the
    permutation keyed by key[i]. `n` and `key` are scalars or arrays broadcast against
    `positions`; every position must be in range(n). Returns int64."""
    p = np.asarray(positions, np.int64)
    n_arr = np.broadcast_to(np.asarray(n, np.int64), p.shape)
    if p.size and (p.min() < 0 or np.any(p >= n_arr)):
        raise ValueError("positions must lie in range(n)")
    keys = np.broadcast_to(np.asarray(key, np.uint64), p.shape)
    # the domain: 2^b >= n with b = bit_length(n - 1) (exact: frexp of an integer below 2^53)
    b = np.maximum(1, np.frexp((n_arr - 1).astype(np.float64))[1]).astype(np.uint64)
    left_bits, right_bits = b - b // np.uint64(2), b // np.uint64(2)
    with np.errstate(over="ignore"):
        round_keys = [mix(keys + np.uint64(r + 1) * GOLDEN) for r in range(ROUNDS)]
        out = p.astype(np.uint64)
        todo = np.arange(p.size)
        flat_n = n_arr.reshape(-1).astype(np.uint64)
        flat = out.reshape(-1)
        while todo.size:
            flat[todo] = _encipher(
                flat[todo],
                left_bits.reshape(-1)[todo],
                right_bits.reshape(-1)[todo],
                [k.reshape(-1)[todo] for k in round_keys],
            )
            todo = todo[flat[todo] >= flat_n[todo]]
    return out.astype(np.int64)


def _encipher(x, left_bits, right_bits, round_keys) -> np.ndarray:
    """An unbalanced Feistel network over b = left + right bits: the halves swap widths each
    round, so the domain is below 2n and cycle-walking takes under 2 steps on average."""
    one = np.uint64(1)
    left, right = x >> right_bits, x & ((one << right_bits) - one)
    wl, wr = left_bits, right_bits
    for k in round_keys:  # an even number of rounds: the widths end as they began
        f = mix(right ^ k) & ((one << wl) - one)
        left, right = right, left ^ f
        wl, wr = wr, wl
    return (left << wr) | right
