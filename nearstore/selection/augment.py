"""Random augmentations of samples as the scan holds them (numpy, decoded), by name and seeded:
what SAS averages a sample's embedding over, beside the data. The trainer's own augmentations
stay the trainer's (`StreamingLoader(transform=, dali_transform=, views=)`); these stand in for
them where the data lies.

- "signal": 1-D signals (n, L) or (n, channels, L), as MNIST-1D's generator varies them: a
  circular shift of up to a tenth of L, a gain in [0.8, 1.2], Gaussian noise of 0.2 of the
  batch's spread (SimCLR on MNIST-1D probed best with it of 0.05, 0.1 and 0.2: bench/ssl_selection.py).
- "image": images (n, channels, H, W): a horizontal flip half the time, a crop of H × W from the
  image padded by an eighth of its side (edges repeated).
- "none": the sample as it is (SAS then compares the samples themselves).
- "auto": "image" for 4-D batches, "signal" for 2-D and 3-D ones, else "none".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nearstore.errors import ParameterError

Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
AUGMENTATIONS = ("auto", "signal", "image", "none")


def check_augmentation(name: str) -> None:
    if name not in AUGMENTATIONS:
        raise ParameterError(f"augment must be one of {list(AUGMENTATIONS)}, got {name!r}")


def augmentation(name: str, x: np.ndarray) -> Augmentation:
    """The augmentation `name` for a batch like `x` ("auto" chosen by its shape)."""
    check_augmentation(name)
    if name == "auto":
        name = "image" if x.ndim == 4 else "signal" if x.ndim in (2, 3) and x.dtype != object else "none"
    if name != "none" and (x.dtype == object or x.ndim < {"signal": 2, "image": 4}[name]):
        raise ParameterError(f"augment={name!r} takes a batch of {name}s, got an array of shape {x.shape}")
    if name == "image" and x.shape[1] > 4 and x.shape[-1] <= 4:  # (n, H, W, C): flips would swap colours
        raise ParameterError(
            f"samples of shape {x.shape[1:]} look channels-last; image augmentations flip and crop the last two "
            "axes: store images channels first, (C, H, W) (x.transpose(0, 3, 1, 2)), or give augment='none'"
        )
    return {"signal": shifted_signals, "image": cropped_images, "none": lambda x, rng: x}[name]


def shifted_signals(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each signal shifted circularly by up to L // 10, times a gain in [0.8, 1.2], plus noise."""
    x = np.asarray(x, dtype=np.float32)
    n, length = len(x), x.shape[-1]
    reach = max(1, length // 10)
    shift = rng.integers(-reach, reach + 1, size=n)
    index = (np.arange(length)[None, :] - shift[:, None]) % length  # (n, L)
    index = index.reshape(n, *([1] * (x.ndim - 2)), length)
    shifted = np.take_along_axis(x, np.broadcast_to(index, x.shape), axis=-1)
    gain = rng.uniform(0.8, 1.2, size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
    noise = rng.normal(scale=0.2 * float(x.std()) or 0.2, size=x.shape).astype(np.float32)
    return shifted * gain + noise


def cropped_images(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image flipped left-right half the time, then cropped back to H × W from its copy
    padded by H // 8 (edges repeated)."""
    x = np.asarray(x, dtype=np.float32)
    n, _, height, width = x.shape
    pad = max(1, height // 8)
    flip = rng.random(n) < 0.5
    x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    top, left = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = top[:, None] + np.arange(height)[None, :]  # (n, H)
    cols = left[:, None] + np.arange(width)[None, :]  # (n, W)
    return padded[
        np.arange(n)[:, None, None, None],
        np.arange(x.shape[1])[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
