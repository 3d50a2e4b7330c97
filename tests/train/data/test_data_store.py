"""The sample store's decoder agrees with streaming's own on every sample of every dataset."""

from __future__ import annotations

import numpy as np

from helpers import data_module


def test_fast_decoder_equals_streaming_decode_on_every_sample(sharded_example):
    store = data_module(sharded_example).store
    checked = 0
    for d, shard_set in enumerate(store.sets):
        for row in range(shard_set.n_samples):
            fast = store.get(d, row)
            ref = store.dataset.get_item(int(store.offsets[d] + row))     # streaming's decode
            assert fast.keys() == ref.keys()
            for key in ref:
                a, b = fast[key], ref[key]
                if isinstance(b, np.ndarray):
                    assert a.dtype == b.dtype and np.array_equal(a, b), (shard_set.dataset_id, row, key)
                else:
                    assert a == b and type(a) is type(b) or (isinstance(b, int) and a == b), (key, a, b)
            checked += 1
    assert checked == sum(s.n_samples for s in store.sets) > 2000
