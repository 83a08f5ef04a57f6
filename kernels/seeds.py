"""Seeds in [0, 2**64), as the selectors take them, for torch's CPU generator."""

from __future__ import annotations

import numpy as np
import torch

TORCH_SEED_BITS = 32


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator drawing what `seed` alone fixes. torch's takes a seed's low 32 bits only
    (2**32 + s draws what s does), so a seed of more bits is hashed to 32 by numpy's SeedSequence;
    one under 2**32 seeds it as it is (what every measured figure drew)."""
    if seed >> TORCH_SEED_BITS:
        seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    return torch.Generator().manual_seed(seed)
