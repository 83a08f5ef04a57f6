"""Dataset distillation by gradient matching (Zhao et al., 2021), and its progressive form, PDD
(Chen et al., 2024): several small synthetic sets, each learnt where training on the ones
before leaves a model, trained on cumulatively. Each set is written as a nearstore dataset, so
a trainer reads it like any other (`StreamingLoader`).

Gradient matching: a synthetic set S of `per_class` samples a class is learnt so that, for a
network θ, the loss gradient on S's class c matches the gradient on real samples of class c,
d(∇L(θ; S_c), ∇L(θ; R_c)) = Σ_layers (1 − cos) summed over output rows, over many θ: each outer
step draws θ (freshly initialised; for a stage after the first, first trained on the sets before
it, so the stage matches the later dynamics the earlier sets leave), and alternates
`inner` updates of S with steps of θ on S."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nearstore.checks import check_integer
from nearstore.errors import DatasetError, ParameterError
from nearstore.storage import Dataset, write_dataset


def match_distance(synthetic: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over layers and output rows of 1 − cos between gradients (biases as one row)."""
    total = torch.zeros(())
    for s, r in zip(synthetic, real):
        s2, r2 = (
            s.reshape(s.shape[0], -1) if s.ndim > 1 else s[None],
            r.reshape(r.shape[0], -1) if r.ndim > 1 else r[None],
        )
        total = total + (1 - nn.functional.cosine_similarity(s2, r2, dim=1, eps=1e-8)).sum()
    return total


def distill(
    x: np.ndarray,
    y: np.ndarray,
    model: Callable[[], nn.Module],
    *,
    per_class: int,
    stages: int = 1,
    outer: int = 100,
    inner: int = 5,
    learning_rate: float = 0.1,
    warm_epochs: int = 20,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`stages` synthetic sets of `per_class` samples a class, from real samples `x` (n, ...) and
    labels `y`: stage 1 matches gradients of fresh networks; stage s > 1 of networks first trained
    `warm_epochs` on stages 1..s−1 (PDD). Each starts from real samples drawn at random. Returns
    [(x, y) of each stage]."""
    for name, value in {"per_class": per_class, "stages": stages, "outer": outer, "inner": inner}.items():
        check_integer(name, value, 1)
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)  # what the networks are trained on
    if len(x) != len(y):
        raise ParameterError(f"x and y must hold the same samples, got {len(x)} and {len(y)}")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):  # one would make its class's whole synthetic set NaN
        raise DatasetError(f"sample {int(bad[0])} of x holds NaN or inf: no synthetic sample can be learnt from it")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) and counts.min() < per_class:
        smallest = classes[counts.argmin()]
        raise ParameterError(
            f"per_class={per_class} real samples start each class's synthetic set, but class {smallest} has "
            f"{counts.min()}"
        )
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    real_x, real_y = torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    by_class = {int(c): np.flatnonzero(y == c) for c in classes}
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _ in range(stages):
        start = np.concatenate([rng.choice(by_class[int(c)], per_class, replace=False) for c in classes])
        syn_x = real_x[start].clone().requires_grad_(True)
        syn_y = real_y[start].clone()
        optimizer = torch.optim.SGD([syn_x], lr=learning_rate, momentum=0.5)
        for _ in range(outer):
            net = model()
            if done:  # PDD: where the stages before leave a network
                _train(net, torch.cat([d[0] for d in done]), torch.cat([d[1] for d in done]), warm_epochs)
            params = [p for p in net.parameters() if p.requires_grad]
            step = torch.optim.SGD(params, lr=0.01)
            for _ in range(inner):
                loss = torch.zeros(())
                for c in classes:
                    real = rng.choice(by_class[int(c)], min(128, len(by_class[int(c)])), replace=False)
                    g_real = torch.autograd.grad(nn.functional.cross_entropy(net(real_x[real]), real_y[real]), params)
                    mine = syn_y == int(c)
                    g_syn = torch.autograd.grad(
                        nn.functional.cross_entropy(net(syn_x[mine]), syn_y[mine]), params, create_graph=True
                    )
                    loss = loss + match_distance(g_syn, [g.detach() for g in g_real])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step.zero_grad()  # θ one step on the synthetic set, as it would be trained
                nn.functional.cross_entropy(net(syn_x.detach()), syn_y).backward()
                step.step()
        done.append((syn_x.detach(), syn_y))
    return [(sx.numpy(), sy.numpy()) for sx, sy in done]


def write_stages(stages: list[tuple[np.ndarray, np.ndarray]], root: str | Path) -> list[Dataset]:
    """Each stage's synthetic set as a nearstore dataset, root/stage-<s>.zarr."""
    return [
        write_dataset(str(Path(root) / f"stage-{s}.zarr"), [{"x": sx, "y": sy}], overwrite=True)
        for s, (sx, sy) in enumerate(stages)
    ]


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
