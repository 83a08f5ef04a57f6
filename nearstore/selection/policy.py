"""The default path, and the budget-dependent choices it makes, measured by bench/selection_quality.py
and bench/round_cost.py: round 0 (`nearstore select`, a server's first round) is `Graft()` over
every sample with the model-free proxy; later rounds (`StreamingLoader.reselect`, a server's
`select`) are `default_reselect(keep)` with the trainer's model."""

from __future__ import annotations

from typing import Any

from nearstore.selection.plan import check_keep

DEFAULT_METHOD = "graft"
# Above this share of the data, GRAFT's default windows hold 64 samples, not 128, and re-selection
# pools 1.5x the budget, not 2x: a pool of twice the budget would be over two thirds of the data,
# and MaxVol would keep 64 of every 128 (such rounds cost 0.11-0.14 of a full-data epoch).
LARGE_BUDGET = 1 / 3
# Round 0, before there is a model: a class whose budget is under this many samples keeps a draw of
# what the model-free proxy does not suspect, not GRAFT's picks. MaxVol over that weak proxy's
# gradients takes a class's outliers, which pays only once a class keeps enough samples to cover its
# bulk too (data-poor pruning should keep easy samples: Sorscher et al., 2022). Round 0 alone, the
# draw against MaxVol's picks: digits at 14 samples a class +10 to +25 points (clean, noisy), at 35
# and 70 −1.7 to +3.9; token sequences at 120 +9.6 and +14.5; MNIST-1D at 100 −2.0 ± 5.9, at 250 and
# 500 −3.5 and −4.1 (docs/benchmarks.md#round-0-on-small-budgets-2026-12-05-evening).
DRAW_BELOW = 128
# Round 0, where the model-free proxy is right on at least this share of its held-out warm-up
# (`windows.trust`: its recall per class, averaged, a class the warm-up missed counting 0): MaxVol
# picks among each class's typical half, the samples whose p(label | x) reaches the class's median
# on the warm-up (`Graft.typical`). MaxVol over that proxy takes a class's least typical samples,
# which on small clean data teach a model least; a proxy right less often than wrong ranks samples
# by its own errors, not by how typical they are. Seeds 0-9 paired against MaxVol over every sample
# (docs/benchmarks.md#selection-on-images): rendered shapes at 25% (the proxy right on 61-66%), round 0
# alone +4.0 ± 4.8 points (7 of 10 ahead), the default path +1.0 ± 7.8 (6/10); 100 classes at 50%
# (seeds 0-4; 84%, 52% with 20% noise) −0.03 clean, +0.3 and +2.0 with symmetric and pair noise;
# MNIST-1D (22-41% on every case and seed) lost 1.6 points a cell with it (−4.8 to +0.5, seeds
# 0-4), so is left alone, as are token sequences (30-40%); digits' and 100 classes' budgets up to
# 25% are drawn. Conservative: shapes with 20-40% noise read 0.31-0.43 (shut) and gained 2.6-5.8
# points forced on; the reading overlaps MNIST-1D's, so it is not what tells them apart.
TRUSTED_PROXY = 0.5
# GRAFT's gradients enter MaxVol tempered, g · ‖g‖^(p − 1) (`Graft.norm_power`): p = 0.5 with the
# trainer's model; with the model-free proxy (round 0) 0.25, as its largest gradients are its random
# features' outliers more than a class's hard samples. The default path with round 0 at 0.25
# against 0.5, later rounds alike, seeds 0-4 paired: MNIST-1D's 21 cases at 5-25% +0.44 points a
# case (16 of 21 ahead, 58 of 105 seeds; −2.5 to +3.2), shapes at 25% +2.1 ± 3.6; later rounds at
# 0.25 too lost (long tail + noise at 10%: −3.2); digits' round 0 draws every class (`DRAW_BELOW`): unchanged
# (docs/benchmarks.md#round-0-tempered-further-2026-12-06-stop-40).
NORM_POWER = 0.5
MODEL_FREE_NORM_POWER = 0.25


def default_window(keep: float) -> int:
    """GRAFT's window at `keep`: 128 samples, 64 above LARGE_BUDGET. There MaxVol would keep 64
    of every 128, and a round cost 0.11-0.14 of a full-data epoch on MNIST-1D; in windows of 64,
    0.085-0.093."""
    return 64 if keep > LARGE_BUDGET else 128


def default_reselect(keep: float) -> tuple[str, dict[str, Any]]:
    """What `StreamingLoader.reselect` and a server's later rounds run at `keep`, with the trainer's
    model: GRAFT (its defaults: suspected label errors muted, the round it replaces not carried)
    on a fresh pool of twice the budget per class. On MNIST-1D, every 3 epochs, the whole path
    beat random by +2.3 sigma at 10% and +3.1 at 25% (5 seeds), and by +3.5 and +6.4 with 20% of
    the labels randomised (3 seeds), where the path of 2026-12-03 (pools holding the last round,
    nothing muted) lost to random by 3.1 and 2.7 sigma; on clean data that path was 0.4-0.6
    points a seed better. A round 0 on a pool lost 1.2 points at 10%.
    Above LARGE_BUDGET, a pool of 1.5x the budget (in windows of 64, `default_window`): at 50% a
    pool of twice the budget is every sample and its round, in windows of 128, cost 0.13 of a
    full-data epoch, this one 0.09, for 0.14 points a seed (measured on the 2026-12-03 path)."""
    check_keep(keep)
    return DEFAULT_METHOD, {"pool": 1.5 if keep > LARGE_BUDGET else 2.0}
