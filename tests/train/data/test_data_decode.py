"""The batch decoder (decode.py, SampleStore.get_batch) gives what the per-sample decoder gives."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import assert_same_batches, data_module

from concept_shard.mds import VALUE_DTYPE_CODE, MDSDatasetWriter, SampleDecoder
from concept_train.data import kernels
from concept_train.data.deliver.loader import RankSlice
from concept_train.data.read.decode import SampleBatch, ShardBuffers, ShardLayout, copy_values, locate

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

NAMES = ["n_counts", "row", "cell_id", "obs.cell_type", "obs.absent"]


def _assert_same(a: SampleBatch, b: SampleBatch):
    for field in ("genes", "counts", "lengths"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field
    assert a.scalars.keys() == b.scalars.keys() and a.strings == b.strings
    for k in a.scalars:
        assert a.scalars[k].dtype == b.scalars[k].dtype and np.array_equal(a.scalars[k], b.scalars[k]), k


def test_batch_decoder_equals_the_sample_decoder_on_every_sample(sharded_example):
    store = data_module(sharded_example).store
    pairs = np.array([(d, r) for d, s in enumerate(store.sets) for r in range(s.n_samples)])
    pairs = pairs[np.random.default_rng(0).permutation(len(pairs))]  # many shards per batch, any order
    for chunk in np.array_split(pairs, 20):
        fast = store.get_batch(chunk[:, 0], chunk[:, 1], NAMES)
        _assert_same(fast, store.get_batch(chunk[:, 0], chunk[:, 1], NAMES, compiled=False))
        assert "obs.absent" not in fast.strings


def test_batches_spanning_more_shards_than_stay_mapped_read_their_own_cells(sharded_example, monkeypatch):
    """With 2 shards kept mapped between batches, each batch spans more (its shards stay mapped
    while it is read, in slots grown for it) and the next maps others in slots freed by eviction:
    every batch still equals the per-sample decoder's, also a shard's cells asked again later."""
    from concept_train.data.read import store as store_module

    monkeypatch.setattr(store_module, "MAPPED", 2)
    store = data_module(sharded_example).store
    pairs = np.array([(d, r) for d, s in enumerate(store.sets) for r in range(0, s.n_samples, 3)])
    pairs = pairs[np.random.default_rng(2).permutation(len(pairs))]
    spans = []
    for chunk in [*np.array_split(pairs, 12), pairs[:40]]:
        fast = store.get_batch(chunk[:, 0], chunk[:, 1], NAMES)
        _assert_same(fast, store.get_batch(chunk[:, 0], chunk[:, 1], NAMES, compiled=False))
        spans.append(len(np.unique(store._locate(chunk[:, 0], chunk[:, 1])[1])))
        assert len(store._maps) <= max(2, spans[-1])
    assert min(spans) > 2  # every batch spanned more shards than stay mapped


def test_without_numba_the_per_sample_decoder_reads_the_same_samples(sharded_example, monkeypatch):
    """kernels.py promises the NumPy path where numba is missing: the store maps its shards
    without numba's typed List there and reads the samples the compiled path reads."""
    pairs = np.array([(d, r) for d, s in enumerate(data_module(sharded_example).store.sets) for r in (0, 5)])
    expected = data_module(sharded_example).store.get_batch(pairs[:, 0], pairs[:, 1], NAMES)
    monkeypatch.setattr(kernels, "numba", None)
    for name in ("numba", "numba.typed"):  # `import numba` fails, as on a machine without it
        monkeypatch.setitem(sys.modules, name, None)
    store = data_module(sharded_example).store
    _assert_same(store.get_batch(pairs[:, 0], pairs[:, 1], NAMES, compiled=False), expected)
    assert isinstance(store._buffers.bufs, list)


def test_shard_dtypes_give_the_same_values_in_the_shards_own_dtypes(sharded_example):
    store = data_module(sharded_example).store
    pairs = np.array([(d, r) for d, s in enumerate(store.sets) for r in range(0, s.n_samples, 7)])
    pairs = pairs[np.random.default_rng(1).permutation(len(pairs))]
    seen = set()
    for chunk in [*np.array_split(pairs, 6), pairs[pairs[:, 0] == 0][:50]]:  # mixed files, then one file
        own = store.get_batch(chunk[:, 0], chunk[:, 1], NAMES, shard_dtypes=True)
        _assert_same(own, store.get_batch(chunk[:, 0], chunk[:, 1], NAMES, compiled=False, shard_dtypes=True))
        wide = store.get_batch(chunk[:, 0], chunk[:, 1], NAMES)
        assert np.array_equal(own.genes, wide.genes) and np.array_equal(own.counts, wide.counts)
        samples = store.get_many(chunk[:, 0], chunk[:, 1])
        assert own.genes.dtype == np.result_type(*{s["genes"].dtype for s in samples})
        assert own.counts.dtype == np.result_type(*{s["counts"].dtype for s in samples})
        seen.add((own.genes.dtype.itemsize < 8, own.counts.dtype != np.float64))
    assert (True, True) in seen  # the example holds files in narrow dtypes


@pytest.mark.parametrize("genes_enc", ["ndarray:uint16", "ndarray:uint32", "ndarray"])
def test_every_value_dtype_is_cast_as_numpy_casts(tmp_path, genes_enc):
    """Counts of every dtype MDS codes (float16 through the NumPy fallback), between other samples."""
    columns = {"genes": genes_enc, "counts": "ndarray", "n_counts": "float64", "cell_id": "str", "row": "int64"}
    writer = MDSDatasetWriter(tmp_path, columns, None, 1 << 20)
    rng = np.random.default_rng(1)
    samples = []
    for i, dtype in enumerate([*VALUE_DTYPE_CODE, "float16", "uint8"]):
        n = int(rng.integers(1, 300))
        gdt = genes_enc.partition(":")[2] or "int32"
        samples.append(
            {
                "genes": np.sort(rng.choice(60000, n, replace=False)).astype(gdt),
                "counts": (rng.random(n) * 100).astype(dtype),
                "n_counts": float(i) + 0.5,
                "cell_id": f"cell-{i}-é",
                "row": i - 3,
            }
        )
    encoded = [writer.encode_sample(s) for s in samples]
    writer.abort()
    buf = np.frombuffer(b"xx" + b"".join(encoded), np.uint8)  # unaligned on purpose
    starts = 2 + np.cumsum([0] + [len(e) for e in encoded[:-1]])
    decoder = SampleDecoder(writer.names, writer.encodings, writer.sizes)
    layout = ShardLayout(writer.names, writer.encodings, writer.sizes, NAMES)
    order = rng.permutation(len(samples))
    buffers = ShardBuffers(1)
    buffers.put(0, None, buf)
    bufs, slot = buffers.bufs, np.zeros(len(order), np.int64)
    pos, size, first, count, code = locate(layout, bufs, slot, starts[order])
    ref = SampleBatch.from_samples([decoder(e) for e in (encoded[i] for i in order)], NAMES)
    assert np.array_equal(count[:, 0], ref.lengths) and np.array_equal(count[:, 1], ref.lengths)
    dest = np.concatenate([[0], np.cumsum(ref.lengths)[:-1]])
    genes, counts = np.empty(len(ref.genes), np.int64), np.empty(len(ref.counts), np.float64)
    copy_values(bufs, slot, first[:, 0], count[:, 0], code[:, 0], dest, genes)
    copy_values(bufs, slot, first[:, 1], count[:, 1], code[:, 1], dest, counts)
    assert np.array_equal(genes, ref.genes) and np.array_equal(counts, ref.counts)


def test_an_empty_rank_slice_gives_an_empty_batch(sharded_example):
    """More ranks than cells in a batch: some ranks make a batch of no cells, as before the decoder."""
    maker = data_module(sharded_example, ["datamodule.dataloader.train.num_workers=0"]).train_loader().maker
    world = maker.plan.batch_size + 2
    maker.ranks = RankSlice(rank=world - 1, world=world)
    batch = maker.make(0)
    assert batch.n_cells == 0 and batch.cell_ids == [] and batch.tokens.numel() == 0
    assert batch.cu_seqlens.tolist() == [0] and all(t.numel() == 0 for t in batch.labels.values())


def test_the_kernels_read_native_arrays_and_native_scalar_columns_only():
    """ShardLayout.supported (mds.native_encoding, split as before): genes and counts as native
    ndarrays, the wanted other columns as str / int64 / float64; a column not asked for is ignored."""

    def supported(genes, counts, **others):
        encs = {"genes": genes, "counts": counts, **others}
        names = sorted(encs)
        return ShardLayout(names, [encs[n] for n in names], [None] * len(names), ["cell_id", "row"]).supported

    assert supported("ndarray:uint16", "ndarray", cell_id="str", row="int64", extra="pkl")
    assert supported("ndarray", "ndarray:float32", cell_id="str", row="float64")
    assert not supported("ndarray:uint16", "ndarray", cell_id="ndarray", row="int64")
    assert not supported("ndarray:uint16", "ndarray", cell_id="str", row="int32")


def test_batches_are_the_same_from_both_shard_formats(sharded_example, sharded_earlier_example):
    """The loader over the example project sharded with varint entries (read in place) and in the
    earlier format (zstd-compressed arrays, decompressed on first use): the same training and
    validation batches, and the same raw batches in the shards' own dtypes."""
    overrides = ["datamodule.dataloader.train.num_workers=0"]
    new, old = (data_module(p, overrides) for p in (sharded_example, sharded_earlier_example))
    assert_same_batches(new.train_loader(), old.train_loader())
    val_new, val_old = new.val_loaders(), old.val_loaders()
    assert val_new.keys() == val_old.keys()
    for key in val_new:
        assert_same_batches(val_new[key], val_old[key])
    pairs = np.array([(d, r) for d, s in enumerate(new.store.sets) for r in range(0, s.n_samples, 5)])
    pairs = pairs[np.random.default_rng(3).permutation(len(pairs))]
    for chunk in np.array_split(pairs, 4):
        for own in (False, True):
            a = new.store.get_batch(chunk[:, 0], chunk[:, 1], NAMES, shard_dtypes=own)
            _assert_same(a, old.store.get_batch(chunk[:, 0], chunk[:, 1], NAMES, shard_dtypes=own))


def test_varints_of_every_size_decode_and_widen_as_the_sample_decoder_gives(tmp_path):
    """Varint genes and counts (concept_shard/entries.py) of one-byte to six-byte values, batches of
    one kind and mixed: the kernels' values, and in the shards' own dtypes the dtype the per-sample
    decoder gives (a first guess too narrow is decoded again wider; one too wide is narrowed)."""
    from concept_shard import entries
    from concept_train.data.read.store import _Group, _values

    columns = {"genes": "bytes", "counts": "bytes", "n_counts": "int64", "cell_id": "str", "row": "int64"}
    writer = MDSDatasetWriter(tmp_path, columns, None, 1 << 20)
    rng = np.random.default_rng(4)
    kinds = [(300, 2), (300, 200), (70_000, 300), (2**20, 70_000), (300, 2**40)]  # (top gene, top count)
    encoded, kind_of = [], []
    for i in range(40):
        top_gene, top_count = kinds[i % len(kinds)]
        n = int(rng.integers(1, 200))
        genes = np.sort(rng.choice(top_gene, n, replace=False))
        counts = rng.integers(1, top_count, n, dtype=np.int64)
        sample = {
            "genes": entries.encode_cells([0, n], genes, True)[0].tobytes(),
            "counts": entries.encode_cells([0, n], counts, False)[0].tobytes(),
            "n_counts": int(counts.sum()),
            "cell_id": f"c{i}",
            "row": i,
        }
        encoded.append(writer.encode_sample(sample))
        kind_of.append(i % len(kinds))
    writer.abort()
    buf = np.frombuffer(b"x" + b"".join(encoded), np.uint8)  # unaligned on purpose
    starts = 1 + np.cumsum([0] + [len(e) for e in encoded[:-1]])
    decoder = SampleDecoder(writer.names, writer.encodings, writer.sizes)
    layout = ShardLayout(writer.names, writer.encodings, writer.sizes, NAMES)
    buffers = ShardBuffers(1)
    buffers.put(0, None, buf)
    kind_of = np.array(kind_of)
    batches = [np.flatnonzero(kind_of == k) for k in range(len(kinds))] + [rng.permutation(len(encoded))]
    for chosen in batches:
        slot = np.zeros(len(chosen), np.int64)
        spans = locate(layout, buffers.bufs, slot, starts[chosen])
        group = _Group(np.arange(len(chosen)), slot, layout, spans)
        for own in (False, True):
            genes, counts = _values(buffers.bufs, [group], spans.count[:, 0], own)
            ref = SampleBatch.from_samples([decoder(encoded[i]) for i in chosen], [], own)
            assert genes.dtype == ref.genes.dtype and np.array_equal(genes, ref.genes), (chosen, own)
            assert counts.dtype == ref.counts.dtype and np.array_equal(counts, ref.counts), (chosen, own)
