"""Frequent Directions against IncrementalPCA and an exact truncated SVD, on one synthetic stream.

    python bench/kernels.py [--rows N --dim D --ell L --batch B --out bench/results] [--tiny]

The stream has a power-law spectrum (σ_j ∝ j^-1), rotated off the axes, fed in batches. Every
method sees the same batches; each yields B with BᵀB ≈ AᵀA, and is scored by the covariance
error ‖AᵀA − BᵀB‖₂ / ‖A‖²_F against the exact AᵀA in float64. A second FD, identical but for a
shrink through torch.linalg.svd of B, shows what the Gram-matrix shrink buys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import matplotlib
import numpy as np
import torch
from sklearn.decomposition import IncrementalPCA

# The repo root goes first: as a script, bench/ heads sys.path, and this file is also "kernels".
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.frequent_directions as fd_module  # noqa: E402
from kernels import FrequentDirections  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def make_stream(rows: int, dim: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Batches of A = Z diag(j^-1) Q, Z Gaussian, Q a random rotation; float32."""
    gen = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    scale = torch.arange(1, dim + 1, dtype=torch.float64) ** -1.0
    return [
        ((torch.randn(min(batch, rows - start), dim, generator=gen, dtype=torch.float64) * scale) @ rotation).float()
        for start in range(0, rows, batch)
    ]


def svd_shrink(rows: torch.Tensor, ell: int) -> torch.Tensor:
    """The same shrink as fd_module._shrink, computed from an SVD of B instead of eigh of B Bᵀ."""
    _, sigma, vh = torch.linalg.svd(rows, full_matrices=False)
    delta = sigma[ell - 1] ** 2
    return ((sigma[: ell - 1] ** 2 - delta).clamp_min(0).sqrt()[:, None] * vh[: ell - 1]).to(rows.dtype)


def run_fd(batches: list[torch.Tensor], ell: int) -> np.ndarray:
    sketch = FrequentDirections(ell, batches[0].shape[1])
    for batch in batches:
        sketch.update(batch)
    return sketch.sketch().double().numpy()


def run_fd_svd_shrink(batches: list[torch.Tensor], ell: int) -> np.ndarray:
    with mock.patch.object(fd_module, "_shrink", svd_shrink):
        return run_fd(batches, ell)


def run_ipca(batches: list[torch.Tensor], ell: int) -> np.ndarray:
    """IncrementalPCA centres the data, so AᵀA ≈ Vᵀ S² V + n μ μᵀ: return the B with that BᵀB."""
    ipca = IncrementalPCA(n_components=ell)
    for batch in batches:
        ipca.partial_fit(batch.numpy())
    centred = ipca.singular_values_[:, None] * ipca.components_
    return np.vstack([centred, np.sqrt(ipca.n_samples_seen_) * ipca.mean_[None]])


def run_exact_svd(batches: list[torch.Tensor], ell: int) -> np.ndarray:
    """Best rank-ℓ B = S_ℓ V_ℓ from a full SVD of A; needs all of A in memory (not a stream)."""
    _, sigma, vh = torch.linalg.svd(torch.cat(batches), full_matrices=False)
    return (sigma[:ell, None] * vh[:ell]).double().numpy()


METHODS = {
    "FD (ours)": run_fd,
    "FD, SVD shrink": run_fd_svd_shrink,
    "IncrementalPCA": run_ipca,
    "exact SVD": run_exact_svd,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ell", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="time each method this often, keep the best")
    # Small shrinks are latency-bound: on a busy 2-core machine one thread beat two by 30x here.
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4,096 rows of 64, ell 16")
    args = parser.parse_args()
    if args.tiny:
        args.rows, args.dim, args.ell = 4096, 64, 16
    if args.ell < 2 or args.ell > args.dim:
        parser.error(f"--ell must be in [2, --dim], got {args.ell}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)

    batches = make_stream(args.rows, args.dim, args.batch, args.seed)
    gram = sum(b.double().T @ b.double() for b in batches).numpy()  # exact AᵀA of the float32 rows
    sigma2 = np.linalg.eigvalsh(gram)[::-1].clip(0)
    mass = sigma2.sum()  # ‖A‖²_F
    k = args.ell // 2
    # FD: ‖AᵀA − BᵀB‖₂ ≤ ‖A − A_k‖²_F / (ℓ − k), relative to ‖A‖²_F like the errors.
    bound = sigma2[k:].sum() / (args.ell - k) / mass

    seconds = {name: float("inf") for name in METHODS}
    sketches = {}
    # Round robin, best of --repeats: a burst of load on a shared machine then hits every method alike.
    for _ in range(args.repeats):
        for name, method in METHODS.items():
            start = time.perf_counter()
            sketches[name] = method(batches, args.ell)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    results = {}
    for name, sketch in sketches.items():
        error = np.abs(np.linalg.eigvalsh(gram - sketch.T @ sketch)).max() / mass
        results[name] = {"seconds": seconds[name], "rows_per_s": args.rows / seconds[name], "covariance_error": error}
    for name in ("FD (ours)", "FD, SVD shrink"):
        results[name].update(bound=bound, error_over_bound=results[name]["covariance_error"] / bound)

    ours = results["FD (ours)"]
    ratios = {
        name: {
            "speed": ours["rows_per_s"] / r["rows_per_s"],
            "error": ours["covariance_error"] / r["covariance_error"],
        }
        for name, r in results.items()
        if name != "FD (ours)"
    }

    print(
        f"{args.rows} rows x {args.dim} dims, ell={args.ell}, batches of {args.batch}, "
        f"power-law spectrum, {args.threads} torch threads; "
        f"optimal rank-ell error σ²_(ℓ+1)/‖A‖²_F = {sigma2[args.ell] / mass:.2e}"
    )
    print(f"{'method':<16} {'rows/s':>11} {'cov error':>10} {'FD bound k=ℓ/2':>15} {'err/bound':>10}")
    for name, r in results.items():
        bound_cols = f"{r['bound']:>15.2e} {r['error_over_bound']:>10.3f}" if "bound" in r else f"{'':>15} {'':>10}"
        print(f"{name:<16} {r['rows_per_s']:>11,.0f} {r['covariance_error']:>10.2e} {bound_cols}")
    print("ours / theirs:  speed (rows/s)   error")
    for name, ratio in ratios.items():
        print(f"  vs {name:<16} {ratio['speed']:>8.2f}x   {ratio['error']:>8.2f}x")

    args.out.mkdir(parents=True, exist_ok=True)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    report = {"config": config, "methods": results, "ratios": ratios}
    (args.out / "kernels.json").write_text(json.dumps(report, indent=2) + "\n")

    names = list(results)
    fig, (speed_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4))
    # Linear axes, so bar lengths show the ratios the table prints.
    speed_ax.bar_label(speed_ax.barh(names, [results[n]["rows_per_s"] for n in names]), fmt="{:,.0f}")
    speed_ax.set(xlabel="rows / s (higher is better)")
    error_ax.bar_label(error_ax.barh(names, [results[n]["covariance_error"] for n in names]), fmt="{:.2e}")
    error_ax.axvline(bound, color="k", linestyle="--", label=f"FD bound, k = ℓ/2 = {k}")
    error_ax.set(xlabel="‖AᵀA − BᵀB‖₂ / ‖A‖²_F (lower is better)")
    error_ax.legend(loc="upper right")
    for ax in (speed_ax, error_ax):
        ax.margins(x=0.25)  # room for the bar labels
    fig.suptitle(f"{args.rows} × {args.dim} power-law stream, ℓ = {args.ell}")
    fig.tight_layout()
    fig.savefig(args.out / "kernels.png", dpi=120)
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")


if __name__ == "__main__":
    main()
