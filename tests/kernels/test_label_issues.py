from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import ConfidentJoint, label_issues


def brute_force(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confident learning by its definition, one sample at a time."""
    classes = probs.shape[1]
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else np.inf for j in range(classes)])
    out = np.full(len(labels), -1)
    for i, (p, y) in enumerate(zip(probs, labels)):
        confident = [j for j in range(classes) if p[j] >= thresholds[j]]
        if confident:
            best = max(confident, key=lambda j: (p[j], -j))  # the first of equals
            out[i] = best if best != y else -1
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 60), classes=st.integers(2, 6), seed=st.integers(0, 2**31), batch=st.integers(1, 60))
def test_streamed_thresholds_match_the_definition_on_the_whole_set(n, classes, seed, batch, device):
    # `device` only names where to compute: nothing of it carries between examples
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes) * 0.5, n)
    labels = rng.integers(0, classes, n)
    joint = ConfidentJoint(classes)
    for start in range(0, n, batch):  # the thresholds do not depend on how the stream is cut
        part = slice(start, start + batch)
        joint.update(torch.from_numpy(probs[part]).to(device), torch.from_numpy(labels[part]).to(device))
    got = label_issues(
        torch.from_numpy(probs).to(device), torch.from_numpy(labels).to(device), joint.thresholds().to(device)
    )
    assert got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), brute_force(probs, labels))


def test_a_confidently_contradicted_label_is_an_issue_and_an_unsure_one_is_not():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.15, 0.85], [0.1, 0.9], [0.85, 0.15], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    joint = ConfidentJoint(2)
    joint.update(probs, labels)
    # t_0 = 0.85, t_1 = (0.85 + 0.9 + 0.15 + 0.45) / 4 = 0.5875: sample 4 (labelled 1, p_0 = 0.85) is
    # an issue; sample 5 (p_0 = 0.55 < t_0, p_1 = 0.45 < t_1) reaches no threshold: not judged.
    assert label_issues(probs, labels, joint.thresholds()).tolist() == [-1, -1, -1, -1, 0, -1]
    unseen = ConfidentJoint(3).thresholds()
    assert torch.isinf(unseen).all()  # no class has an estimate yet: nothing is an issue
    assert label_issues(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), unseen).tolist() == [-1, -1]


def test_a_class_the_model_does_not_tell_apart_is_never_the_confident_class():
    # the model gives class 0 the same 0.6 whatever the sample: samples labelled 0 get no more of
    # it than the others, so it says nothing about which are 0; class 1 it separates (0.8 vs 0.2)
    probs = torch.tensor([[0.6, 0.2, 0.2], [0.6, 0.2, 0.2], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 1, 2, 2, 1])
    joint = ConfidentJoint(3)
    joint.update(probs, labels)
    assert label_issues(probs, labels, joint.thresholds()).tolist() == [-1, 0, 0, 0, -1]  # plain: class 0 wins
    t = joint.thresholds(separation=1.25)
    # t_0 = 0.6 against 0.475 (1.26x): kept; with the last sample's 0.1 a 0.6 too, it would not be
    assert torch.isfinite(t[0]) and t[1] == pytest.approx(0.5)
    joint = ConfidentJoint(3)
    joint.update(torch.cat([probs[:4], torch.tensor([[0.6, 0.3, 0.1]])]), labels)
    t = joint.thresholds(separation=1.25)
    assert torch.isinf(t[0])  # 0.6 against 0.6: class 0 is no one's suggestion
    assert label_issues(probs[:4], labels[:4], t).tolist() == [-1, -1, -1, -1]


def test_a_gap_within_chance_does_not_separate_a_class():
    """With alpha, a class's gap must pass a z-test at alpha / C: probabilities that scatter at
    random (a model at chance) clear a ratio of 1.25 in some of 100 classes of 40 samples, never the
    test; a model right on half the samples clears both with as few."""
    torch.manual_seed(0)
    labels = torch.arange(4000) % 100
    scattered = torch.softmax(3 * torch.randn(4000, 100, dtype=torch.float64), 1)
    joint = ConfidentJoint(100)
    joint.update(scattered, labels)
    assert torch.isfinite(joint.thresholds(separation=1.25)).sum() > 5
    assert torch.isinf(joint.thresholds(separation=1.25, alpha=0.01)).all()
    knowing = torch.softmax(3 * torch.randn(4000, 100, dtype=torch.float64) + 8 * torch.eye(100)[labels], 1)
    joint = ConfidentJoint(100)
    joint.update(knowing, labels)
    assert (knowing.argmax(1) == labels).double().mean() > 0.5
    assert torch.isfinite(joint.thresholds(separation=1.25, alpha=0.01)).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="must agree"):
        label_issues(torch.ones(3, 2), torch.zeros(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ConfidentJoint(1)


def test_nan_probabilities_and_labels_outside_the_classes_are_refused():
    probs = torch.full((4, 3), 1 / 3)
    labels = torch.tensor([0, 1, 2, 0])
    joint = ConfidentJoint(3)
    bad = probs.clone()
    bad[1, 0] = float("nan")  # it made class 1's threshold NaN: the class never flagged again
    for call in (lambda p, y: joint.update(p, y), lambda p, y: label_issues(p, y, torch.full((3,), 0.5))):
        with pytest.raises(ValueError, match="probs contain NaN or inf"):
            call(bad, labels)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got 0..3"):
            call(probs, torch.tensor([0, 1, 3, 0]))
        with pytest.raises(TypeError, match="labels must be integer class indices, got torch.float32"):
            call(probs, labels.float())  # gather() raised for the update, label_issues took them
    assert joint.seen == 0
