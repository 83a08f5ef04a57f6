"""What windowed selection holds while it streams: each class's unfinished window, no more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import facility_location, facility_location_of_factors
from nearstore import AdaCore, AugmentAware, Craig, RandomFeatureProxy, write_dataset
from nearstore.selection import windows
from nearstore.selection.selectors import augment_aware
from nearstore.selection.windows import ClassWindows, medoids


def held_bytes(parts: tuple[torch.Tensor, ...]) -> int:
    """The bytes of the storages behind `parts` (a view holds all of its storage)."""
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parts}.values())


def test_a_class_s_unfinished_window_holds_its_own_samples_not_the_batch_it_was_cut_from():
    classes = ClassWindows(128, lambda group: (0.1, 1))
    ids, parts = np.arange(1000), (torch.ones(1000, 64), torch.ones(1000, 8))
    assert len(list(classes.add(0, ids, parts))) == 7  # 896 samples in full windows, 104 wait
    [(_, waiting, (last, _))] = classes.finish()
    np.testing.assert_array_equal(waiting, ids[896:])
    assert held_bytes(last) == 104 * (64 + 8) * 4
    assert waiting.base is None or waiting.base.nbytes == waiting.nbytes


@pytest.mark.parametrize("selector", [Craig(window=128), AdaCore(window=128)], ids=str)
def test_many_small_classes_hold_less_than_one_window_of_whole_gradients(tmp_path, monkeypatch, selector):
    num_classes, width = 200, 32  # 3 samples a class: every class's window waits for the pass's end
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(num_classes), 3))
    x = (rng.normal(size=(len(y), 8)) + rng.normal(size=(num_classes, 8))[y]).astype(np.float32)
    dataset = write_dataset(str(tmp_path / "classes.zarr"), [{"x": x, "y": y}], shard_samples=128)
    proxy = RandomFeatureProxy(num_classes, width=width, seed=1).fit(x, y)
    held = []

    class Counted(ClassWindows):
        def finish(self):
            for last in super().finish():
                held.append(held_bytes(last[2][0]))
                yield last

    monkeypatch.setattr(windows, "ClassWindows", Counted)
    selection = selector.select(dataset, 0.3, proxy=proxy)
    assert len(held) == num_classes and len(selection) == num_classes
    one_window = 128 * num_classes * (width + 1) * 4  # whole gradients, C · (H + 1) floats a sample
    assert sum(held) == len(y) * (num_classes + width + 1) * 4 < one_window  # the factors, C + H + 1 floats


def test_medoids_are_numpy_s_own_arrays_not_views_of_torch_tensors():
    points = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    rows, weights = medoids(points, 5)
    assert rows.flags.owndata and weights.flags.owndata  # a pick outlives its window's tensors
    _, sizes = facility_location(points, 5)
    np.testing.assert_array_equal(weights, (sizes.double() * 5 / 40).float().numpy())


def test_augment_aware_at_1000_classes_holds_each_draw_s_factors_not_their_mean_gradients(tmp_path, monkeypatch):
    num_classes, width, draws = 1000, 32, 2  # 3 samples a class: every class's window waits for the pass's end
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(num_classes), 3))
    x = (rng.normal(size=(len(y), 8)) + rng.normal(size=(num_classes, 8))[y]).astype(np.float32)
    dataset = write_dataset(str(tmp_path / "classes.zarr"), [{"x": x, "y": y}], shard_samples=128)
    proxy = RandomFeatureProxy(num_classes, width=width, seed=1).fit(x, y)
    held, formed = [], []

    class Counted(ClassWindows):
        def finish(self):
            for last in super().finish():
                held.append(held_bytes(last[2][0]))
                yield last

    def counted_medoids(residual, inputs, k):
        formed.append((tuple(residual.shape), tuple(inputs.shape)))
        return facility_location_of_factors(residual, inputs, k)

    monkeypatch.setattr(augment_aware, "ClassWindows", Counted)
    monkeypatch.setattr(windows, "facility_location_of_factors", counted_medoids)
    selection = AugmentAware(window=128, augmentations=draws, augment="signal").select(dataset, 0.3, proxy=proxy)
    assert len(held) == num_classes and len(selection) == num_classes
    whole = len(y) * num_classes * (width + 1) * 4  # every class's ḡ, C · (H + 1) floats a sample: 396 MB
    assert sum(held) == len(y) * draws * (num_classes + width + 1) * 4 < whole / 15  # A · (C + H + 1) floats
    # each window decided from its draws' factors (3 samples), ḡ never formed
    assert formed == [((3, draws, num_classes), (3, draws, width + 1))] * num_classes


def test_a_pick_or_a_draw_takes_a_suspect_only_where_no_other_row_is_left():
    # muted rows filled in id order, suspects among the atypical ones: from keep 0.5 on, round 0
    # took samples it reported mislabelled beside unsuspected ones it left
    residual = torch.zeros(8, 3)
    residual[[0, 1]] = 1.0  # two live rows; 2..7 muted: 2, 3 and 5 suspects, the others atypical
    window = ((residual, torch.ones(8, 2)), 5)
    ids = np.arange(100, 108)
    suspected = lambda ids: np.isin(ids, [102, 103, 105])  # noqa: E731

    def fill(waiting):  # a pick past its rank: the live rows, then the lowest muted ones
        return [windows.unscored(np.arange(k)) for _, k in waiting]

    picked = windows.Decisions(fill, suspected=suspected)
    picked.add(0, ids, window)
    picked.decide()
    assert sorted(picked.kept[0][0].tolist()) == [100, 101, 104, 106, 107]
    drawn = windows.Decisions(fill, draw=lambda group: True, seed=3, suspected=suspected)
    drawn.add(0, ids, ((residual, torch.ones(8, 2)), 7))  # one suspect must come: only 6 others
    kept = drawn.kept[0][0].tolist()
    assert len(kept) == 7 and {100, 101, 104, 106, 107} <= set(kept) and len({102, 103, 105} & set(kept)) == 2
