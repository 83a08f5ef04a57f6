from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import FrequentDirections, agreement_scores, last_layer_gradients, residual_scores, sketch_basis


def brute_force_scores(g: np.ndarray, v: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    scores = []
    for row in g:
        p, c = v @ row, v @ consensus
        norm = np.linalg.norm(p)
        scores.append(0.0 if norm == 0 else p @ c / (norm * np.linalg.norm(c)))
    return np.array(scores)


def projector(v: np.ndarray) -> np.ndarray:
    return v.T @ v


def test_basis_spans_the_top_singular_directions() -> None:
    rng = np.random.default_rng(0)
    sketch = rng.standard_normal((12, 40)) * np.arange(12, 0, -1)[:, None]
    _, _, vt = np.linalg.svd(sketch, full_matrices=False)
    for k in (1, 5, 12):
        v = sketch_basis(torch.from_numpy(sketch), k).numpy()
        assert v.shape == (k, 40)
        np.testing.assert_allclose(v @ v.T, np.eye(k), atol=1e-12)
        np.testing.assert_allclose(projector(v), projector(vt[:k]), atol=1e-10)
    assert sketch_basis(torch.from_numpy(sketch)).shape == (12, 40)
    assert sketch_basis(torch.from_numpy(sketch), 50).shape == (12, 40)


def test_basis_drops_zero_directions() -> None:
    rng = np.random.default_rng(1)
    sketch = np.zeros((8, 30), dtype=np.float32)
    sketch[:3] = rng.standard_normal((3, 2)) @ rng.standard_normal((2, 30))  # rank 2, zero padding
    v = sketch_basis(torch.from_numpy(sketch))
    assert v.shape == (2, 30) and v.dtype == torch.float32
    assert sketch_basis(torch.from_numpy(sketch), 6).shape == (2, 30)
    np.testing.assert_allclose(sketch @ projector(v.numpy()), sketch, atol=1e-5)
    assert sketch_basis(torch.zeros(4, 9)).shape == (0, 9)


def test_scores_match_brute_force(device: str) -> None:
    rng = np.random.default_rng(2)
    g = rng.standard_normal((50, 20))
    g[7] = 0.0
    v, _ = np.linalg.qr(rng.standard_normal((20, 6)))
    v = v.T
    consensus = g.mean(axis=0)

    scores = agreement_scores(*(torch.from_numpy(x).to(device) for x in (g, v, consensus)))

    assert scores.shape == (50,) and scores.device.type == device
    np.testing.assert_allclose(scores.cpu().numpy(), brute_force_scores(g, v, consensus), atol=1e-12)
    assert scores[7] == 0


def test_row_orthogonal_to_the_subspace_scores_zero() -> None:
    basis = torch.eye(5)[:2]
    g = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 0.0, 9.0], [-2.0, 0.0, 5.0, 0.0, 0.0]])
    scores = agreement_scores(g, basis, torch.tensor([1.0, 0.0, 4.0, 4.0, 4.0]))
    torch.testing.assert_close(scores, torch.tensor([0.0, 2**-0.5, -1.0]))


def test_full_svd_basis_gives_plain_cosine_similarity() -> None:
    # With V spanning all of R^D, V is orthogonal and cos(V g, V ḡ) = cos(g, ḡ).
    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.standard_normal((40, 16)))
    basis = sketch_basis(torch.from_numpy(rng.standard_normal((16, 16))))
    assert basis.shape == (16, 16)
    consensus = g.mean(dim=0)
    expected = torch.nn.functional.cosine_similarity(g, consensus[None], dim=1)
    torch.testing.assert_close(agreement_scores(g, basis, consensus), expected, rtol=1e-10, atol=1e-10)


def test_sketched_basis_agrees_with_exact_basis_on_low_rank_gradients() -> None:
    # Gradients of a 3-class head over rank-2 features live in a subspace the FD sketch captures
    # exactly, so sketched and exact-SVD bases give the same scores.
    torch.manual_seed(4)
    features = torch.randn(600, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)
    logits = features @ torch.randn(10, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (600,))
    g = last_layer_gradients(logits, labels, features, bias=False)
    fd = FrequentDirections(16, g.shape[1], dtype=torch.float64)
    fd.update(g)
    sketched = sketch_basis(fd.sketch())
    exact = sketch_basis(g)
    assert sketched.shape == exact.shape
    consensus = g.mean(dim=0)
    torch.testing.assert_close(
        agreement_scores(g, sketched, consensus), agreement_scores(g, exact, consensus), rtol=1e-8, atol=1e-8
    )


def test_scores_are_scale_invariant_and_bounded() -> None:
    rng = np.random.default_rng(5)
    g = torch.from_numpy(rng.standard_normal((30, 12)))
    basis = sketch_basis(torch.from_numpy(rng.standard_normal((4, 12))))
    consensus = g.mean(dim=0)
    scores = agreement_scores(g, basis, consensus)
    assert scores.abs().max() <= 1
    scaled = agreement_scores(g * torch.rand(30, 1, dtype=torch.float64) * 100, basis, consensus * 1e-3)
    torch.testing.assert_close(scaled, scores)


def test_consensus_outside_the_subspace_is_an_error() -> None:
    with pytest.raises(ValueError, match="consensus has no component in the sketch subspace"):
        agreement_scores(torch.ones(3, 4), torch.eye(4)[:2], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="consensus has no component in the sketch subspace"):
        agreement_scores(torch.ones(3, 4), torch.empty(0, 4), torch.ones(4))


@pytest.mark.parametrize(
    ("embeddings", "basis", "consensus", "message"),
    [
        (torch.ones(4), torch.eye(4), torch.ones(4), r"embeddings must have shape \(n, D\), got \(4,\)"),
        (torch.ones(3, 4), torch.eye(5), torch.ones(4), r"basis must have shape \(r, 4\), got \(5, 5\)"),
        (torch.ones(3, 4), torch.eye(4), torch.ones(5), r"consensus must have shape \(4,\), got \(5,\)"),
        (torch.full((3, 4), float("nan")), torch.eye(4), torch.ones(4), "embeddings contains NaN or inf"),
        (torch.ones(3, 4), torch.eye(4) * float("inf"), torch.ones(4), "basis contains NaN or inf"),
        (torch.ones(3, 4), torch.eye(4), torch.full((4,), float("nan")), "consensus contains NaN or inf"),
    ],
)
def test_score_input_errors(
    embeddings: torch.Tensor, basis: torch.Tensor, consensus: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        agreement_scores(embeddings, basis, consensus)


def test_integer_embeddings_are_named_by_both_scores() -> None:
    # residual_scores failed inside torch.finfo, naming no input
    for score in (residual_scores, lambda e, b: agreement_scores(e, b, torch.ones(4))):
        with pytest.raises(TypeError, match="embeddings must be a floating point tensor, got torch.int64"):
            score(torch.ones(3, 4, dtype=torch.int64), torch.eye(4))


@pytest.mark.parametrize(
    ("sketch", "k", "message"),
    [
        (torch.ones(4), None, r"sketch must have shape \(ell, dim\)"),
        (torch.ones(0, 4), None, r"got \(0, 4\)"),
        (torch.ones(3, 4), 0, "k must be >= 1 or None, got 0"),
        (torch.tensor([[1.0, float("nan")]]), None, "sketch contains NaN or inf"),
    ],
)
def test_basis_errors(sketch: torch.Tensor, k: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sketch_basis(sketch, k)


def test_residual_scores_match_the_projection_off_the_subspace(device):
    generator = torch.Generator().manual_seed(5)
    g = torch.randn(30, 12, generator=generator, dtype=torch.float64)
    g[3] = 0
    basis = torch.linalg.qr(torch.randn(12, 4, generator=generator, dtype=torch.float64)).Q.T  # (4, 12) orthonormal
    g[7] = 2.5 * basis[1]  # inside the subspace
    scores = residual_scores(g.to(device), basis.to(device)).cpu()
    expected = torch.tensor(
        [
            np.linalg.norm(row - basis.T.numpy() @ (basis.numpy() @ row)) / (np.linalg.norm(row) or 1)
            for row in g.numpy()
        ]
    )
    torch.testing.assert_close(scores, expected)
    assert scores[3] == 0 and scores[7] < 1e-12
    with pytest.raises(ValueError, match="must share D"):
        residual_scores(g, basis[:, :5])


@pytest.mark.parametrize("scale", [1e-25, 1e20])  # float32 norms of such rows under- or overflowed
def test_scores_are_scale_free_in_float32(scale: float) -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 12))
    basis = sketch_basis(torch.from_numpy(rng.normal(size=(4, 12))))
    consensus = g.mean(0)

    def scores(rows: np.ndarray, centre: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, c = torch.from_numpy(rows).float(), torch.from_numpy(centre).float()
        return agreement_scores(x, basis.float(), c), residual_scores(x, basis.float())

    for plain, scaled in zip(scores(g, consensus), scores(g * scale, consensus * scale)):
        assert torch.isfinite(scaled).all()
        torch.testing.assert_close(scaled, plain, atol=1e-5, rtol=1e-5)
