"""Mixture: several loaders' batches in one seeded order, shares by proportion, exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from loaders import Mixture, StreamingLoader
from loaders.mixture import shares
from nearstore.errors import DatasetError, ParameterError

A, B = np.arange(0, 1000), np.arange(1000, 1500)  # two selections: 20 and 10 batches of 50


def two(store, seed: int = 0, **options) -> Mixture:
    loaders = [StreamingLoader(store, ids, batch_size=50, backend="torch", device="cpu", seed=1) for ids in (A, B)]
    return Mixture(loaders, seed=seed, **options)


def ids_of(batches) -> list[list[int]]:
    """The id-encoded store's x[i, 0] is i: each batch's ids."""
    return [x[:, 0].round().long().tolist() for x, _ in batches]


def test_largest_remainders_split_exactly():
    assert shares(np.array([0.5, 0.25, 0.25]), 10).tolist() == [5, 3, 2]
    assert shares(np.array([1 / 3] * 3), 100).sum() == 100


def test_by_default_an_epoch_is_one_epoch_of_each_loader(id_store):
    mixture = two(id_store)
    assert len(mixture) == 30
    batches = ids_of(mixture)
    seen = Counter(i for batch in batches for i in batch)
    assert sorted(seen) == [*A, *B] and set(seen.values()) == {1}
    firsts = [batch[0] < 1000 for batch in batches]
    assert 0 < sum(firsts[:10]) < 10  # interleaved, not one loader then the other


def test_proportions_set_each_loaders_share_and_loaders_go_on_across_epochs(id_store):
    mixture = two(id_store, proportions=[1, 1], batches_per_epoch=20)
    epochs = [ids_of(mixture) for _ in range(2)]
    for batches in epochs:
        assert sum(batch[0] < 1000 for batch in batches) == 10  # half from each
    a = Counter(i for batches in epochs for batch in batches for i in batch if i < 1000)
    b = Counter(i for batches in epochs for batch in batches for i in batch if i >= 1000)
    assert sorted(a) == list(A) and set(a.values()) == {1}  # A downsampled: its one epoch over two
    assert sorted(b) == list(B) and set(b.values()) == {2}  # B upsampled: two of its epochs


def test_the_order_is_a_function_of_the_seed(id_store):
    assert ids_of(two(id_store, seed=3)) == ids_of(two(id_store, seed=3))
    assert ids_of(two(id_store, seed=3)) != ids_of(two(id_store, seed=4))


def test_resume_delivers_exactly_the_batches_not_yet_delivered(id_store):
    whole = two(id_store, proportions=[2, 1], batches_per_epoch=25)
    ids_of(whole)  # an epoch in: the loaders mid-way through theirs
    expected = ids_of(whole)
    broken = two(id_store, proportions=[2, 1], batches_per_epoch=25)
    ids_of(broken)
    batches = iter(broken)
    first = ids_of(next(batches) for _ in range(9))
    state = broken.state_dict()
    resumed = two(id_store, proportions=[2, 1], batches_per_epoch=25)
    resumed.load_state_dict(state)
    assert len(resumed) == 25 - 9  # what the next iteration yields
    assert first + ids_of(resumed) == expected
    assert resumed.epoch == 2 and len(resumed) == 25


def test_a_round_selected_between_epochs_is_the_next_epochs_and_a_state_resumes_it_exactly(id_store):
    mixture = two(id_store)
    ids_of(mixture)
    new = mixture.loaders[0].reselect(0.2, method="random", seed=5)  # between mixture epochs: A's next epoch
    assert len(mixture.loaders[0]) == 10 and len(mixture) == 20
    batches = iter(mixture)
    head = ids_of(next(batches) for _ in range(4))
    state = mixture.state_dict()
    rest = ids_of(batches)
    seen = Counter(i for batch in head + rest for i in batch)
    assert seen == Counter([*new.ids.tolist(), *B.tolist()])  # the new round and B's, each sample once
    reloaded = two(id_store)
    reloaded.load_state_dict(state)
    again = reloaded.state_dict()  # saved before iterating: the same place
    assert again["batches_done"] == 4 and again["counts"] == state["counts"]
    resumed = two(id_store)
    resumed.load_state_dict(again)
    assert len(resumed) == len(rest)
    assert ids_of(resumed) == rest


@pytest.mark.parametrize("between", ["reselect", "reselect_ahead"])
def test_a_state_taken_after_a_loaders_last_batch_resumes_exactly(id_store, between):
    # B had given its epoch's last batch: the resumed mixture never ended B's epoch, and its next
    # epochs were scheduled from B's old length or replayed B's epoch number
    def run(stop: int | None) -> list[list[int]]:
        mixture, seen = two(id_store), []
        for epoch in range(3):
            if epoch == (1 if between == "reselect_ahead" else 2):  # B's epoch 2 iterates the round
                getattr(mixture.loaders[1], between)(0.6, method="random", seed=7)
            last_b = max(k for k, loader in enumerate(mixture.schedule(mixture.epoch)) if loader == 1)
            for k, batch in enumerate(mixture):
                seen += ids_of([batch])
                if epoch == stop and k == last_b:
                    state = mixture.state_dict()
                    mixture = two(id_store)
                    mixture.load_state_dict(state)
                    seen += ids_of(mixture)
                    break
        return seen

    assert run(stop=1) == run(stop=None)


def test_a_state_of_another_mixture_is_refused_and_changes_nothing(id_store, tmp_path):
    with pytest.raises(DatasetError, match="Mixture state_dict must be a mapping .*, got str"):
        two(id_store).load_state_dict("state.pt")  # a path, not the state loaded from it
    state = two(id_store, seed=1).state_dict()
    with pytest.raises(DatasetError, match="seed=1; this mixture has 2"):
        two(id_store, seed=2).load_state_dict(state)
    mixture, untouched = two(id_store, seed=1), two(id_store, seed=1)
    batches, expected = iter(mixture), ids_of(untouched)
    head = ids_of(next(batches) for _ in range(5))  # its loaders' places are not the state's
    state["loaders"][1]["dataset"] = {**state["loaders"][1]["dataset"], "url": "elsewhere", "num_samples": 7}
    with pytest.raises(DatasetError, match="from dataset 'elsewhere'"):
        mixture.load_state_dict(state)
    # the epoch goes on as it would have (loaders were put back by reloading their states, which
    # set their live epochs aside: a third of A's samples came three times, a third once)
    assert head + ids_of(batches) == expected
    assert ids_of(mixture) == ids_of(untouched)


@pytest.mark.parametrize(
    ("place", "message"),
    [  # len() went negative, numpy's repeats refused, or the epoch never ended
        ({"batches_done": 10**6}, "says 1000000 batches of 30 were delivered"),
        ({"counts": [-5, 35]}, r"counts must be 2 integers >= 0 .*, got \[-5, 35\]"),
        ({"counts": [0, 0]}, r"got \[0, 0\]"),
        ({"counts": [20, 10], "batches_done": 31}, "says 31 batches of 30"),
    ],
)
def test_a_place_that_does_not_fit_the_mixtures_epoch_is_refused(id_store, place, message):
    state = two(id_store).state_dict()
    mixture = two(id_store)
    with pytest.raises(DatasetError, match=message):
        mixture.load_state_dict({**state, **place})
    assert len(mixture) == 30


def test_counts_of_a_fixed_epoch_must_fill_it(id_store):
    state = two(id_store, batches_per_epoch=20).state_dict()
    with pytest.raises(DatasetError, match=r"20 in all\), got \[10\*\*6, 3\]|20 in all\), got \[1000000, 3\]"):
        two(id_store, batches_per_epoch=20).load_state_dict({**state, "counts": [10**6, 3]})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"proportions": [1]}, "proportions must be 2 positive numbers"),
        ({"proportions": [1, -1]}, "proportions must be 2 positive numbers"),
        ({"proportions": [True, 1]}, "proportions must be 2 positive numbers"),  # numpy read True and '1' as 1
        ({"proportions": ["1", 2]}, "proportions must be 2 positive numbers"),
        ({"proportions": [1, [2]]}, "proportions must be 2 positive numbers"),
        ({"batches_per_epoch": 0}, "batches_per_epoch must be"),
        ({"seed": 1.5}, "seed must be"),
    ],
)
def test_bad_options_are_named(id_store, options, message):
    with pytest.raises(ParameterError, match=message):
        two(id_store, **options)
    with pytest.raises(ParameterError, match="one or more StreamingLoaders"):
        Mixture([])


def test_proportions_whose_sum_overflows_are_what_they_say(id_store):
    # their sum is inf: every proportion was 0, and len() disagreed with the batches an epoch yields
    mixture = two(id_store, proportions=[1e308, 1e308])
    assert mixture.proportions == (0.5, 0.5)
    assert len(mixture) == sum(1 for _ in mixture)


def test_batches_of_different_shapes_mix(id_store, tmp_path):
    from nearstore import write_dataset

    other = write_dataset(
        str(tmp_path / "other.zarr"), [{"x": np.ones((100, 3, 4), np.float32), "y": np.zeros(100, np.int64)}]
    )
    mixture = Mixture(
        [
            StreamingLoader(id_store, A[:100], batch_size=50, backend="torch", device="cpu"),
            StreamingLoader(other, batch_size=50, backend="torch", device="cpu"),
        ]
    )
    shapes = Counter(tuple(x.shape) for x, _ in mixture)
    assert shapes == {(50, 8): 2, (50, 3, 4): 2}


def test_a_loader_given_twice_is_refused(id_store):
    loader = StreamingLoader(id_store, batch_size=50, backend="torch")
    with pytest.raises(ParameterError, match="a loader is given twice"):
        Mixture([loader, loader])


def test_loaders_whose_batches_hold_other_things_are_refused(id_store, tmp_path):
    # weights in one loader's batches and not the other's: `for x, y, w in mixture` failed at a random step
    from nearstore import write_dataset

    unlabelled = write_dataset(
        str(tmp_path / "unlabelled.zarr"), [{"x": np.ones((100, 8), np.float32)}], label_array=None
    )
    weighted = StreamingLoader(id_store, A, batch_size=50, backend="torch", weights=True)
    plain = StreamingLoader(id_store, B, batch_size=50, backend="torch")
    with pytest.raises(
        ParameterError, match=r"loader 1 .* yields batches of \(x, y\), loader 0 .* of \(x, y, weights\)"
    ):
        Mixture([weighted, plain])
    with pytest.raises(ParameterError, match=r"loader 1 .* of \(x\), loader 0 .* of \(x, y\)"):
        Mixture([plain, StreamingLoader(unlabelled, batch_size=50, backend="torch")])
    assert Mixture([weighted, StreamingLoader(id_store, B, batch_size=50, backend="torch", weights=True)])


def test_a_closed_mixture_lets_go_of_its_loaders(id_store):
    # a Mixture had no close(): its loaders' threads, connections and caches stayed while it was referred to
    first = StreamingLoader(id_store, np.arange(0, 2500, 2), batch_size=100, backend="torch")
    second = StreamingLoader(id_store, np.arange(1, 2500, 2), batch_size=100, backend="torch")
    with Mixture([first, second]) as mixture:
        assert sum(len(y) for _, y in mixture) == 2500
        assert first.cache.samples == second.cache.samples == 1250
    assert first.cache.samples == second.cache.samples == 0  # each loader closed: its own cache emptied
    with pytest.raises(RuntimeError, match="was closed"):
        next(iter(mixture))
