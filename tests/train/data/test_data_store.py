"""The sample store reads every sample of every dataset as plain streaming reads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import REPO, data_module, reference_samples


def test_fast_decoder_equals_streaming_decode_on_every_sample(sharded_example):
    """Local shards are indexed and decompressed without streaming (local.py) and decoded by the
    store's own decoder: each sample equals what a plain StreamingDataset over its dataset gives."""
    store = data_module(sharded_example).store
    checked = 0
    for d, shard_set in enumerate(store.sets):
        samples = reference_samples(shard_set.directory)
        assert len(samples) == shard_set.n_samples
        for row in range(shard_set.n_samples):
            fast = store.get(d, row)
            ref = samples[row]
            assert fast.keys() == ref.keys()
            for key in ref:
                a, b = fast[key], ref[key]
                if isinstance(b, np.ndarray):
                    assert a.dtype == b.dtype and np.array_equal(a, b), (shard_set.dataset_id, row, key)
                else:
                    assert a == b and type(a) is type(b) or (isinstance(b, int) and a == b), (key, a, b)
            checked += 1
    assert checked == sum(s.n_samples for s in store.sets) > 2000


def test_local_shards_are_read_without_streaming(earlier_project_copy):
    """A run over local shards neither imports streaming (3 s and 300 MB per process: it loads
    transformers and scikit-learn) nor needs it: the `.zstd` shards of the earlier format it draws
    from are decompressed beside themselves, byte for byte the files index.json records, and
    nothing half-written stays."""
    import json

    from concept_shard.integrity import check_file

    project = earlier_project_copy
    for raw in _raw_shards(project / "shards"):
        raw.unlink()
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from pathlib import Path\n"
        "from helpers import data_module\n"
        f"dm = data_module(Path({str(project)!r}), ['datamodule.dataloader.train.num_workers=0'])\n"
        "batches = iter(dm.train_loader())\n"
        "[next(batches) for _ in range(5)]\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'streaming', 'transformers', 'sklearn'})\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    decompressed = 0
    for index in (project / "shards").rglob("index.json"):
        assert not [p.name for p in index.parent.iterdir() if p.name.endswith(".tmp")]
        for shard in json.loads(index.read_text())["shards"]:
            raw = index.parent / shard["raw_data"]["basename"]
            if raw.exists():
                check_file(raw.read_bytes(), shard["raw_data"], str(raw))
                decompressed += 1
    assert decompressed >= 1


def test_shards_are_read_in_place_leaving_nothing_beside_them(sharded_project_copy):
    """The default format (varint entries, uncompressed: concept_shard/entries.py) is read where it
    lies: after batches from every file of the project, its shard directories hold the same files
    with the same bytes (disk after an epoch: 1.00x the built shards)."""
    project = sharded_project_copy

    def files() -> set:  # not a reader's .obs_codes cache (another test may have left one in the copy)
        return {p for p in (project / "shards").rglob("*") if p.is_file() and ".obs_codes" not in p.parts}

    before = {p: p.read_bytes() for p in files()}
    assert [p for p in before if p.name.endswith(".mds")] and not [p for p in before if p.suffix == ".zstd"]
    dm = data_module(project, ["datamodule.dataloader.train.num_workers=0"])
    _batches(dm, 40)
    for loader in dm.val_loaders().values():
        next(iter(loader))
    assert files() == set(before)
    assert all(p.read_bytes() == data for p, data in before.items())


def _raw_shards(root) -> set:
    return {p for p in root.rglob("shard.*.mds")}


def _batches(dm, n: int):
    it = iter(dm.train_loader())
    return [next(it) for _ in range(n)]


def test_local_shards_through_a_bounded_cache_leave_no_copy_beside_them(earlier_project_copy, tmp_path):
    """With datamodule.cache_limit, local shards of the earlier format are read through the cache
    streaming keeps for remote ones: the same batches, nothing decompressed beside the shards, the
    cache under its limit; without it they are read in place (and streaming keeps a decompressed
    copy there)."""
    import json

    import torch

    project, cache = earlier_project_copy, tmp_path / "scratch"
    for raw in _raw_shards(project / "shards"):  # copies left by earlier readers of the example
        raw.unlink()
    shards = [s for index in (project / "shards").rglob("index.json") for s in json.loads(index.read_text())["shards"]]
    per_shard = [s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in shards]
    limit = max(4 * max(per_shard), sum(per_shard) // 4)  # a quarter of what reading every shard takes
    assert len(shards) > 16 and limit < sum(per_shard)
    cached = data_module(
        project,
        [f"PATH.LOCAL_DIR={cache}", f"datamodule.cache_limit={limit}", "datamodule.dataloader.train.num_workers=0"],
    )
    assert all(s.remote and s.directory.is_relative_to(cache) for s in cached.train_sets)
    got = _batches(cached, 40)
    assert not _raw_shards(project / "shards")
    # an evicted shard is unmapped too (a deleted file still mapped keeps its disk space), and
    # read again through streaming
    store = cached.store
    d, row = store.index_of[cached.train_sets[0].dataset_id], 0
    before_eviction = store.get(d, row)
    shard_id = store.dataset.spanner[int(store.offsets[d] + row)][0]
    assert shard_id in store._maps
    store.dataset.evict_shard(shard_id)
    again = store.get(d, row)
    assert all(
        np.array_equal(again[k], v) if isinstance(v, np.ndarray) else again[k] == v for k, v in before_eviction.items()
    )
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert not [m for m in maps if str(cache) in m and m.endswith("(deleted)")]
    assert [m for m in maps if str(cache) in m]  # the shards in the cache are read mapped
    used = sum(
        p.stat().st_size
        for p in cache.rglob("*")
        if p.is_file() and ".obs_codes" not in p.parts and p.name != "index.json"
    )
    assert 0 < used <= limit
    in_place = data_module(project, ["datamodule.dataloader.train.num_workers=0"])
    want = _batches(in_place, 40)
    for a, b in zip(got, want):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.values, b.values)
    assert _raw_shards(project / "shards")  # in place, copies appear beside the shards
