"""The resume contract, one check for every loader (as torchdata.nodes' shared state test): stop
after any number of batches, save the state, and a fresh loader given it delivers exactly what
the uninterrupted one would have, in the same order."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import torch

from loaders import StreamingLoader


def sample_ids(batch) -> list[int]:
    """The id-encoded store's x[i, 0] is i."""
    return batch[0][:, 0].round().long().tolist()


def batches(loader: StreamingLoader, epochs: int) -> Iterator[list[int]]:
    """The ids of each batch the loader delivers until it has completed `epochs` epochs."""
    while loader.epoch < epochs:
        for batch in loader:
            yield sample_ids(batch)


def checkpointed(state: dict) -> dict:
    """A state as a trainer's checkpoint gives it back: through torch.save and a plain torch.load,
    which loads tensors and Python's containers and scalars only (weights_only, its default)."""
    saved = io.BytesIO()
    torch.save({"loader": state}, saved)
    saved.seek(0)
    return torch.load(saved)["loader"]


def assert_resumes_at_every_batch(make: Callable[[], StreamingLoader], epochs: int = 2) -> int:
    """For every batch boundary of `epochs` epochs: the state of a loader stopped there, through a
    checkpoint, resumes on a fresh loader to the same remaining batches, and the resumed loader's
    len is the batches its next iteration yields. Returns the number of boundaries checked."""
    reference = list(batches(make(), epochs))
    for stop in range(len(reference) + 1):
        interrupted = make()
        delivered = batches(interrupted, epochs)
        head = [next(delivered) for _ in range(stop)]
        state = checkpointed(interrupted.state_dict())
        resumed = make()
        resumed.load_state_dict(state)
        rest = []
        if resumed.epoch < epochs:  # a state taken after the last epoch's last batch is of the epoch after
            promised = len(resumed)
            rest = [sample_ids(batch) for batch in resumed]
            assert len(rest) == promised, f"resumed after {stop} batches: len {promised}, {len(rest)} batches"
        rest += batches(resumed, epochs)
        assert head + rest == reference, f"resumed after {stop} batches: {len(rest)} batches followed"
    return len(reference) + 1
