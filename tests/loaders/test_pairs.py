"""Several modalities a sample: a loader yields x and its paired arrays (fixed-size or ragged) row
for row, (x, tokens, y), from a store and through the cache, resumably; bad pairings refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from resume import assert_resumes_at_every_batch

from loaders import StreamingLoader
from nearstore import DatasetError, ParameterError, write_dataset

N = 600


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """x[i] = (i, ...), a ragged caption of i % 4 + 1 tokens all equal to i, z[i] = (i, -i), y = i % 3,
    and an encoded array; shards of 64."""
    ids = np.arange(N)
    tokens = np.empty(N, dtype=object)
    tokens[:] = [np.full(i % 4 + 1, i, dtype=np.int32) for i in ids]
    blobs = np.empty(N, dtype=object)
    blobs[:] = [b"\xff\xd8" + bytes([i % 256]) for i in ids]
    data = {
        "x": (ids[:, None] + np.zeros((1, 8))).astype(np.float32),
        "tokens": tokens,
        "z": np.stack([ids, -ids], 1).astype(np.float32),
        "blob": blobs,
        "y": (ids % 3).astype(np.int64),
    }
    url = str(tmp_path_factory.mktemp("pairs") / "pairs.zarr")
    return write_dataset(url, [data], shard_samples=64)


@pytest.mark.parametrize("cache", [True, False])
def test_each_sample_comes_with_its_paired_arrays_row_for_row(paired, cache):
    loader = StreamingLoader(
        paired,
        np.arange(0, N, 2),
        batch_size=50,
        paired_arrays=("tokens", "z"),
        weights=True,
        cache=cache,
        backend="torch",
        device="cpu",
    )
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, tokens, z, y, w in loader:
            ids = x[:, 0].long()
            assert tokens.is_nested and torch.equal(tokens.offsets().diff(), ids % 4 + 1)
            assert torch.equal(tokens.to_padded_tensor(-1)[:, 0], ids.int())
            assert torch.equal(z, torch.stack([ids, -ids], 1).float()) and torch.equal(y, ids % 3)
            assert torch.all(w == 1)
            seen += ids.tolist()
    assert sorted(seen) == sorted(2 * list(range(0, N, 2)))


def test_fixed_size_pairs_pass_through_dali(paired):
    loader = StreamingLoader(paired, batch_size=64, paired_arrays=["z"], backend="dali", device="cpu")
    for x, z, y in loader:
        assert torch.equal(z[:, 0], x[:, 0]) and torch.equal(y, x[:, 0].long() % 3)


def test_a_paired_loader_resumes_at_every_batch(paired):
    def make():
        return StreamingLoader(
            paired, np.arange(0, N, 5), batch_size=32, paired_arrays=("tokens",), backend="torch", device="cpu"
        )

    assert assert_resumes_at_every_batch(make) > 4


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"paired_arrays": ("w",)}, DatasetError, "paired array 'w' is not a sample array of .* other than x and y"),
        ({"paired_arrays": ("y",)}, DatasetError, "paired array 'y' is not a sample array"),
        ({"paired_arrays": ("x",)}, DatasetError, "paired array 'x' is not a sample array"),
        ({"paired_arrays": ("z", "z")}, ParameterError, "names an array twice"),
        ({"paired_arrays": "z"}, ParameterError, "must be a sequence of array names"),
        ({"paired_arrays": ("blob",)}, ParameterError, "'blob' .* holds encoded bytes: pairing those is not built"),
        ({"paired_arrays": ("tokens",), "backend": "dali"}, ParameterError, "array 'tokens' .* holds ragged samples"),
    ],
)
def test_bad_pairings_are_refused_by_name(paired, options, error, message):
    with pytest.raises(error, match=message):
        StreamingLoader(paired, device="cpu", **options)
