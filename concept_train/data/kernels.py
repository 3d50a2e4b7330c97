"""The compiled (numba) kernels of the data path, in one place: the decoding of a batch's samples
(read/decode.py: `u32`, `sample_starts`, `sample_layout`, `copy_samples`, `take_bytes`) and the
per-batch hot path of the default view (make/tokenize.py, `top-nonzero`): panel membership,
nonzero selection, the order by value then token, the `max_tokens` cap, and the packed output.

make/tokenize.py keeps the NumPy implementation of the same steps as the reference: every strategy,
the training view filters, and any machine without numba use it; `tests/train/data/
test_data_kernel.py` checks that both give identical batches. The NumPy path spends most of a
batch in whole-batch passes (a mask over every nonzero, two argsorts, a rank per entry, scatters
into the packed arrays); here each cell is one pass over its own entries, in place.

numba compiles on first use (about a second) and caches the machine code beside this file or
in NUMBA_CACHE_DIR, so later processes and DataLoader workers load it.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the NumPy path serves (tokenize.py)
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _rank(cand, m, keys, ranked, tally, slots):
        """ranked[:m] = the entries cand[:m] (in token order) stably sorted by key descending, so
        ties stay by token ascending. Integer keys below 2^16 (raw counts) take a counting sort
        when their range is not much larger than m, others a merge sort: the same order. The
        counts go to 4 interleaved tallies (tally holds 4 x (the largest such key + 2)): most keys
        are 1 or 2, and a single tally's increments of one slot would each wait for the last (-10%
        of the rank)."""
        top = 0.0
        integral = True
        for j in range(m):
            k = keys[cand[j]]
            top = max(top, k)
            integral &= (k >= 0) & (k <= 65535) & (k == np.floor(k))
        if integral and top <= 4 * m + 256:
            hi = int(top)
            w = hi + 2
            for j in range(m):  # slot hi - key: descending keys
                s = hi - int(keys[cand[j]])
                slots[j] = s
                tally[(j & 3) * w + s + 1] += 1
            run = 0
            for b in range(w):  # tally[s] = where slot s starts
                run += tally[b] + tally[w + b] + tally[2 * w + b] + tally[3 * w + b]
                tally[b] = run
            for j in range(m):  # in token order: stable
                s = slots[j]
                ranked[tally[s]] = cand[j]
                tally[s] += 1
            tally[: 4 * w] = 0
        else:
            order = np.argsort(-keys[cand[:m]], kind="mergesort")
            for j in range(m):
                ranked[j] = cand[order[j]]

    @numba.njit(cache=True, nogil=True)
    def _top_nonzero(
        genes, counts, keys, values, bounds, member, n_views, max_tokens, out_cell, out_tok, out_val, n_out
    ):
        """Per cell and view v: its nonzero entries whose gene has bit v in `member`, ranked
        (_rank), the first max_tokens into out_*[v] from n_out[v] on. One pass over a cell's
        entries finds the candidates of both views (without branches: the scan is most of the
        work, and a gene's membership is random)."""
        size = 0
        for i in range(len(bounds) - 1):
            size = max(size, bounds[i + 1] - bounds[i])
        cand = np.empty((2, size), np.int64)
        ranked = np.empty(size, np.int64)
        slots = np.empty(size, np.int64)
        # as large as _rank's counting sort can use (keys up to 4 m + 256, and 65535): zeroed per
        # batch, so not the 2 MB that every key below 2^16 would take
        tally = np.zeros(4 * (min(4 * size + 256, 65535) + 2), np.int64)
        for i in range(len(bounds) - 1):
            m0 = 0
            m1 = 0
            for e in range(bounds[i], bounds[i + 1]):
                g = member[genes[e]] * (counts[e] != 0)
                cand[0, m0] = e
                m0 += g & 1
                cand[1, m1] = e
                m1 += g >> 1
            for v in range(n_views):
                m = m0 if v == 0 else m1
                if m == 0:
                    continue
                _rank(cand[v], m, keys, ranked, tally, slots)
                n = n_out[v]
                for r in range(min(m, max_tokens)):
                    e = ranked[r]
                    out_cell[v, n] = i
                    out_tok[v, n] = genes[e]
                    out_val[v, n] = values[e]
                    n += 1
                n_out[v] = n

    @numba.njit(cache=True, nogil=True)
    def _pack(n_cells, toks1, vals1, toks2, vals2, cls_token, lengths, tokens, values, positions, cu):
        """Views 1 and 2 (entries ordered by cell then rank; lengths [2, B] per cell) into one
        packed batch: sequence v*B + i is <cls> then view v of cell i; fills cu (sequence starts)."""
        cu[0] = 0
        start = 0
        for s in range(2 * n_cells):
            start += lengths[s // n_cells, s % n_cells] + 1
            cu[s + 1] = start
        for v in range(2):
            toks = toks1 if v == 0 else toks2
            vals = vals1 if v == 0 else vals2
            e = 0
            for i in range(n_cells):
                start = cu[v * n_cells + i]
                tokens[start] = cls_token
                values[start] = 0.0
                positions[start] = 0
                for r in range(lengths[v, i]):
                    tokens[start + 1 + r] = toks[e]
                    values[start + 1 + r] = vals[e]
                    positions[start + 1 + r] = r + 1
                    e += 1


def top_nonzero(genes, counts, keys, values, bounds, panels, vocab_size: int, max_tokens: int):
    """[(cell, token, value)] of the `top-nonzero` view of each of one or two panels, ordered by
    cell then rank (tokenize.select_view), from one pass over the entries."""
    if not 1 <= len(panels) <= 2:
        raise ValueError("one or two panels")
    member = np.zeros(vocab_size, np.uint8)
    for v, panel in enumerate(panels):
        member[panel] |= 1 << v
    shape = (len(panels), len(genes))
    out_cell, out_tok, out_val = np.empty(shape, np.int64), np.empty(shape, np.int64), np.empty(shape, np.float64)
    n_out = np.zeros(len(panels), np.int64)
    _top_nonzero(
        genes, counts, keys, values, bounds, member, len(panels), max_tokens, out_cell, out_tok, out_val, n_out
    )
    return [(out_cell[v, :n], out_tok[v, :n], out_val[v, :n]) for v, n in enumerate(n_out.tolist())]


def pack_two(n_cells: int, view1, view2, cls_token: int, lengths, tokens, values, positions, cu) -> None:
    """Two views packed into the given arrays (tokenize.pack): the <cls> tokens, values and
    positions [T], and cu_seqlens [2B + 1] (int32)."""
    _pack(n_cells, view1[1], view1[2], view2[1], view2[2], cls_token, lengths, tokens, values, positions, cu)


# ---- decoding a batch's samples (read/decode.py; mds.SampleDecoder is the reference) -------------
if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def u32(buf, p):
        return (
            np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16) | (np.int64(buf[p + 3]) << 24)
        )

    # The typed List of mapped shard files (decode.ShardBuffers), made and changed here: compiled
    # and cached like the kernels (typed List's own methods compile anew in every process, ~0.9 s).
    @numba.njit(cache=True)
    def new_buffers(n, empty):
        bufs = numba.typed.List()
        for _ in range(n):
            bufs.append(empty)
        return bufs

    @numba.njit(cache=True)
    def set_buffer(bufs, i, buf):
        bufs[i] = buf

    @numba.njit(cache=True)
    def add_buffer(bufs, buf):
        bufs.append(buf)

    @numba.njit(cache=True)
    def get_buffer(bufs, i):
        return bufs[i]

    # Each kernel below reads every sample of a batch from the shard its `slot` names in `bufs`
    # (a typed List of the mapped shard files, decode.ShardBuffers): one call per batch, where a call
    # per shard cost more in Python than the copying (a batch of 128 random cells of a large file
    # spans ~30 shards).
    @numba.njit(cache=True, nogil=True)
    def sample_starts(bufs, slot, in_shard, out):
        """Byte offset of each sample in its shard file (MDS: u32 count, then u32 offsets)."""
        for i in range(len(slot)):
            out[i] = u32(bufs[slot[i]], 4 + 4 * in_shard[i])

    @numba.njit(cache=True, nogil=True)
    def sample_layout(bufs, slot, starts, fixed, arrays, dynamic, varint, itemsize, pos, size, first, count, code):
        """Per sample (byte offset `starts[i]` in shard `bufs[slot[i]]`): each column's byte position and size
        (pos, size [n, C]); for each array column a (index into `fixed`), where its values
        start, how many (its bytes after the header, in items of `itemsize[code]`; a `varint`
        column's count is its first varint, -1 when that runs past the column), and their
        dtype code (the column's own, given in `code`, when not `dynamic`)."""
        n_var = 0
        for c in range(len(fixed)):
            if fixed[c] < 0:
                n_var += 1
        for i in range(len(starts)):
            buf = bufs[slot[i]]
            head = starts[i]
            p = head + 4 * n_var
            v = 0
            for c in range(len(fixed)):
                s = fixed[c]
                if s < 0:
                    s = u32(buf, head + 4 * v)
                    v += 1
                pos[i, c] = p
                size[i, c] = s
                p += s
            for a in range(len(arrays)):
                q = pos[i, arrays[a]]
                if varint[a]:
                    end = q + size[i, arrays[a]]
                    n = np.int64(0)
                    shift = 0
                    count[i, a] = -1
                    while q < end:
                        y = np.int64(buf[q])
                        q += 1
                        n |= (y & 127) << shift
                        shift += 7
                        if y < 128:
                            count[i, a] = n
                            break
                    first[i, a] = q
                    continue
                if dynamic[a]:
                    code[i, a] = buf[q]
                    q += 1
                shape = buf[q]
                first[i, a] = q + 1 + (shape >> 2) * (1 << (shape & 3))
                count[i, a] = (pos[i, arrays[a]] + size[i, arrays[a]] - first[i, a]) // itemsize[code[i, a]]

    @numba.njit(cache=True, nogil=True)
    def copy_samples(bufs, slot, first, count, itemsize, dest, out, dtype):
        """The values of sample i (`count[i]` of `dtype` from byte `first[i]` of shard
        `bufs[slot[i]]`) into out[dest[i]:], cast as NumPy's astype casts."""
        for i in range(len(first)):
            src = bufs[slot[i]][first[i] : first[i] + count[i] * itemsize].view(dtype)
            d = dest[i]
            for j in range(len(src)):
                out[d + j] = src[j]

    @numba.njit(cache=True, nogil=True)
    def copy_varints(bufs, slot, first, end, count, dest, out, delta):
        """The `count[i]` varints of sample i (bytes first[i]:end[i] of shard `bufs[slot[i]]`;
        concept_shard/entries.py) into out[dest[i]:], summed up when `delta` (token ids). Returns
        (the largest value written, the first sample whose bytes do not hold count[i] values or -1):
        out may be narrower than a value, and the caller widens it then. A cell whose values all
        take one byte (most) is one tight loop."""
        top = np.int64(0)
        bad = -1
        for i in range(len(first)):
            buf = bufs[slot[i]]
            a = first[i]
            n = count[i]
            d = dest[i]
            if end[i] - a == n:
                if delta:
                    acc = np.int64(0)
                    for j in range(n):
                        acc += buf[a + j]
                        out[d + j] = acc
                    top = max(top, acc)
                else:
                    for j in range(n):
                        out[d + j] = buf[a + j]
                continue
            # only values of two bytes or more can widen the counts' dtype, and a cell's largest
            # token id is its last. (The varint read is written out here and in sample_layout: a
            # shared inlined helper measured 4% slower on this loop, 276 -> 288 us a batch.)
            p = a
            e = end[i]
            k = 0
            acc = np.int64(0)
            while p < e and k < n:
                x = np.int64(buf[p])
                p += 1
                if x >= 128:
                    x &= 127
                    shift = 7
                    while p < e:
                        y = np.int64(buf[p])
                        p += 1
                        x |= (y & 127) << shift
                        shift += 7
                        if y < 128:
                            break
                    if not delta and x > top:
                        top = x
                if delta:
                    acc += x
                    out[d + k] = acc
                else:
                    out[d + k] = x
                k += 1
            if delta and acc > top:
                top = acc
            if (k != n or p != e or buf[e - 1] >= 128) and bad < 0:
                bad = i
        return top, bad

    @numba.njit(cache=True, nogil=True)
    def take_bytes(bufs, slot, pos, out):
        """out[i] = the out.shape[1] bytes at `pos[i]` of shard `bufs[slot[i]]` (a scalar column)."""
        width = out.shape[1]
        for i in range(len(pos)):
            buf = bufs[slot[i]]
            for j in range(width):
                out[i, j] = buf[pos[i] + j]
