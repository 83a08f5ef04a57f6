import torch

from kernels import seeded_generator


def draws(seed: int) -> torch.Tensor:
    return torch.randn(8, generator=seeded_generator(seed))


def test_seeds_under_2_32_draw_as_torch_seeds_them():
    assert torch.equal(draws(5), torch.randn(8, generator=torch.Generator().manual_seed(5)))


def test_seeds_apart_only_above_bit_32_draw_apart():
    # torch's generator alone takes the low 32 bits: 2**32 + 5 would draw what 5 does
    seeds = [5, 5 + 2**32, 5 + 2**63, 2**64 - 1, 2**32]
    drawn = [draws(seed) for seed in seeds]
    assert all(not torch.equal(a, b) for i, a in enumerate(drawn) for b in drawn[i + 1 :])
    assert torch.equal(draws(2**64 - 1), draws(2**64 - 1))
