from __future__ import annotations

import pytest
import torch

from loaders import StreamingLoader
from nearstore import random_select
from nearstore.app.training import fit, rounds_every


@pytest.mark.parametrize("ahead", [False, True])
def test_rounds_every_few_epochs_are_iterated_by_the_same_epochs_asked_ahead_or_not(id_store, ahead):
    loader = StreamingLoader(id_store, random_select(id_store, 0.2, seed=1), batch_size=100, backend="torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    rounds, iterated = rounds_every(loader, model, 2, ahead=ahead), []

    def recorded(epoch: int) -> bool:  # the round epoch `epoch` iterates, once its rounds ran
        due = rounds(epoch)
        iterated.append(loader.round)
        return due

    trained = fit(model, loader, 5, rounds=recorded)
    assert iterated == [0, 0, 1, 1, 2]  # ahead: asked before epochs 1 and 3, taken as they end
    assert sorted(trained.round_seconds) == ([1, 3] if ahead else [2, 4])
