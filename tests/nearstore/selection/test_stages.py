"""The scan's stages, each alone."""

from __future__ import annotations

import numpy as np

from nearstore.selection.stages import rebatch


def test_rebatch_joins_consecutive_batches_in_order():
    sizes = [3, 5, 2, 7, 1]
    starts = np.cumsum([0, *sizes])
    batches = [(np.arange(a, b), {"x": np.arange(a, b) * 10.0}) for a, b in zip(starts, starts[1:])]
    joined = list(rebatch(iter(batches), 6))
    assert [len(ids) for ids, _ in joined] == [8, 9, 1]  # each at least 6 but the last
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in joined]), np.arange(18))
    for ids, batch in joined:
        np.testing.assert_array_equal(batch["x"], ids * 10.0)
