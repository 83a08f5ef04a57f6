"""The one training loop of the demo and the benches, and the models they train: a 1D CNN for
MNIST-1D, a small 2D CNN for images."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from loaders import StreamingLoader

# Adam's rate and the batch size of every run of the demo and the benches, unless a dataset has its own
# recipe (the demo's images, the bench's digits and shapes).
LEARNING_RATE = 3e-3
BATCH_SIZE = 128

# Called before each epoch with its number: runs a selection round if one is due, and says so.
Rounds = Callable[[int], bool]


def mnist1d_cnn(num_classes: int = 10) -> nn.Module:
    """A small 1D CNN for MNIST-1D (40-step signals); ~20k parameters."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.BatchNorm1d(1),
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 10, num_classes),
    )


def image_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for RGB images of any size (global average pooling before its last Linear, so a
    proxy may score thumbnails of what it trains on); ~60k parameters."""

    def block(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1),
        *block(32, 64, 2),
        *block(64, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


@dataclass
class Fit:
    """What `fit` did: seconds of each epoch's training, of each round by the epoch before which
    it ran, optimizer steps, and the evaluation after each epoch (where asked for)."""

    epoch_seconds: list[float] = field(default_factory=list)
    round_seconds: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    curve: list[float] = field(default_factory=list)


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: StreamingLoader, epoch: int, *, weighted: bool = False
) -> int:
    """One epoch of `loader` (its epoch `epoch`), cross-entropy averaged over each batch, each
    sample's loss weighted by its selection weight where `weighted` (the loader yields (x, y, w));
    returns the optimizer steps taken."""
    loader.set_epoch(epoch)
    model.train()
    steps = 0
    for x, y, *w in loader:
        optimizer.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        (losses * w[0] if weighted else losses).mean().backward()
        optimizer.step()
        steps += 1
    return steps


def fit(
    model: nn.Module,
    loader: StreamingLoader,
    epochs: int,
    *,
    rounds: Rounds | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    weighted: bool = False,
    desc: str | None = None,
    lr: float = LEARNING_RATE,
) -> Fit:
    """Train `model` with Adam at rate `lr` for `epochs` epochs of `loader`; before each,
    `rounds(epoch)` may run a selection round (timed), after each, `evaluate(model)` may score it
    (not timed). `desc`: a progress bar's title (None: no bar)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    result = Fit()
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=desc is None):
        started = time.perf_counter()
        if rounds is not None and rounds(epoch):
            result.round_seconds[epoch] = time.perf_counter() - started
        started = time.perf_counter()
        result.steps += train_epoch(model, optimizer, loader, epoch, weighted=weighted)
        result.epoch_seconds.append(time.perf_counter() - started)
        if evaluate is not None:
            result.curve.append(evaluate(model))
    return result


def rounds_every(loader: StreamingLoader, model: nn.Module, every: int, *, ahead: bool = False) -> Rounds:
    """Rounds for `fit`: every `every` epochs (not before the first), the model in training pushed
    as the proxy and the loader's default re-selection run (0: never). `ahead`: each round is asked
    for an epoch early (`reselect_ahead`), scored by the model as it was then, and runs while that
    epoch trains; the same epochs iterate it."""

    def due(epoch: int) -> bool:
        asked = epoch + 1 if ahead else epoch  # the epoch that iterates the round asked for now
        if not every or not asked or asked % every:
            return False
        loader.update_proxy(model)
        if ahead:
            loader.reselect_ahead()
        else:
            loader.reselect()
        return True

    return due


def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Share of (x, y) samples whose label the model ranks first, in eval mode, without gradients."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total
