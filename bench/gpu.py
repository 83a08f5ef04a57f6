"""The GPU path against the CPU, side by side in one run (bench/gpu_check.sh runs it on a GPU).

    python bench/gpu.py [--samples 65536] [--device cuda] [--out bench/results] [--tiny]

- Loader: samples/s of one shuffled epoch (after a warm-up epoch), batches of 256, each batch
  normalised ((x − 127.5) / 64): DALI with the transform in its graph on the device, against the
  torch backend moving each batch to the device and normalising there, and against DALI's CPU
  pipeline; float32 (40,) and uint8 (3, 32, 32) samples.
- Images: samples/s of one epoch of decoded, augmented 224 x 224 batches of 64 from photo-like
  JPEGs (300-500 px, `write_photos`): DALI's mixed decoder (nvJPEG) on the device, against DALI's
  CPU decoder and the torch backend's PIL (2 threads each); the issue's target is 3x the CPU path.
- Kernels: Frequent Directions (ℓ = 64, 512 columns, --samples rows in batches of 1,024) and GRAFT's
  batched MaxVol (256 windows of 128, 13 picks each) on the device against the CPU.
- A selection round: `Graft()` round 0 over every sample of a synthetic 10-class store (float32
  (40,)) with the model-free proxy, on the device against the CPU, and how many picks agree.
Prints seconds, rates and ratios (device / CPU); writes gpu.json and gpu.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import FrequentDirections, maxvol  # noqa: E402
from loaders import StreamingLoader  # noqa: E402
from nearstore import Graft, open_dataset, write_dataset  # noqa: E402
from nearstore.app.encoded_converters import imagefolder_images  # noqa: E402
from nearstore.app.synthetic import write_photos  # noqa: E402
from nearstore.storage.images import ImageTransform  # noqa: E402

BATCH = 256


def timed(run: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Median seconds of `run` after one warm-up call, synchronising the device around each."""
    run()
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def store(root: Path, samples: int, shape: tuple[int, ...], dtype: str, classes: int = 10):
    """A synthetic store whose classes differ in mean, written in batches of 4,096."""
    rng = np.random.default_rng(0)

    def batches():
        for start in range(0, samples, 4096):
            y = rng.integers(0, classes, min(4096, samples - start))
            centres = np.linspace(-40, 40, classes)[y].reshape(-1, *[1] * len(shape))
            yield {"x": (127.5 + centres + 30 * rng.normal(size=(len(y), *shape))).clip(0, 255).astype(dtype), "y": y}

    return write_dataset(str(root / f"{dtype}-{'x'.join(map(str, shape))}.zarr"), batches(), overwrite=True)


def loader_rates(dataset, device: str) -> dict[str, float]:
    def dali_normalise(x):
        return (x - 127.5) / 64

    def torch_normalise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() - 127.5) / 64

    def epoch(loader: StreamingLoader) -> Callable[[], int]:
        return lambda: sum(len(x) for x, _ in loader)

    makers = {
        f"DALI on {device}": dict(backend="dali", device=device, dali_transform=dali_normalise),
        f"torch backend to {device}": dict(backend="torch", device=device, transform=torch_normalise),
        "DALI on cpu": dict(backend="dali", device="cpu", dali_transform=dali_normalise),
    }
    rates = {}
    for name, options in makers.items():
        loader = StreamingLoader(dataset, batch_size=BATCH, **options)
        rates[name] = dataset.num_samples / timed(epoch(loader), device, repeats=2)
        print(f"  {name:<26} {rates[name]:>12,.0f} samples/s", flush=True)
    ours = rates[f"DALI on {device}"]
    for name, rate in rates.items():
        if not name.startswith(f"DALI on {device}"):
            print(f"  DALI on {device} / {name:<26} {ours / rate:>6.2f}x")
    return rates


def image_rates(workdir: Path, images: int, device: str, batch_size: int = 64) -> dict[str, float]:
    """Samples/s of decoded, augmented 224 x 224 batches: DALI on the device, on the CPU, and PIL."""
    dataset = imagefolder_images(write_photos(workdir / "photos", images)).write(str(workdir / "photos.zarr"))
    makers = {
        f"DALI mixed on {device}": dict(backend="dali", device=device),
        "DALI on cpu": dict(backend="dali", device="cpu"),
        "torch backend (PIL)": dict(backend="torch", device="cpu"),
    }
    rates = {}
    for name, options in makers.items():
        loader = StreamingLoader(dataset, batch_size=batch_size, images=ImageTransform(size=224), **options)
        rates[name] = images / timed(lambda loader=loader: sum(len(x) for x, _ in loader), device, repeats=2)
        print(f"  {name:<26} {rates[name]:>12,.0f} images/s", flush=True)
    ours = rates[f"DALI mixed on {device}"]
    for name, rate in list(rates.items())[1:]:
        print(f"  DALI mixed / {name:<26} {ours / rate:>6.2f}x")
    return rates


def kernel_seconds(device: str, rows: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(rows, 512, generator=gen) * torch.arange(1, 513) ** -1.0
    grams = torch.randn(256, 128, 64, generator=gen)
    grams = grams @ grams.mT
    out = {}
    for where in ("cpu", device):
        batches = [b.to(where) for b in rows.split(1024)]
        gram = grams.to(where)

        def fd(where: str = where, batches: list[torch.Tensor] = batches) -> torch.Tensor:
            sketch = FrequentDirections(64, 512, device=where)
            for batch in batches:
                sketch.update(batch)
            return sketch.sketch()

        out[where] = {"frequent_directions": timed(fd, where), "maxvol": timed(lambda g=gram: maxvol(g, 13), where)}
    for name in ("frequent_directions", "maxvol"):
        ratio = out[device][name] / out["cpu"][name]
        print(f"  {name:<20} cpu {out['cpu'][name]:.3f} s, {device} {out[device][name]:.3f} s ({ratio:.3f}x)")
    return out


def selection_round(dataset, device: str) -> dict[str, float]:
    picks, seconds = {}, {}
    for where in ("cpu", device):
        # opened afresh each time: a round 0 reads its labels and shard indexes itself
        seconds[where] = timed(lambda w=where: Graft().select(open_dataset(dataset.url), 0.1, device=w), where, 2)
        picks[where] = Graft().select(open_dataset(dataset.url), 0.1, device=where).ids
    agree = len(np.intersect1d(picks["cpu"], picks[device])) / len(picks["cpu"])
    print(
        f"  Graft() round 0 at 10% of {dataset.num_samples}: cpu {seconds['cpu']:.2f} s, {device} "
        f"{seconds[device]:.2f} s ({seconds[device] / seconds['cpu']:.2f}x); picks in common {agree:.1%}"
    )
    return {**{f"{k}_seconds": v for k, v in seconds.items()}, "picks_in_common": agree}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    for offset, (shape, rates) in enumerate(result["loader"].items()):
        names = list(rates)
        axes[0].bar(np.arange(len(names)) + 0.4 * offset, list(rates.values()), 0.4, label=shape)
        axes[0].set_xticks(np.arange(len(names)) + 0.2, names, fontsize=7)
    axes[0].set(ylabel="samples / s", title="loader, one epoch, batches of 256")
    axes[0].legend(fontsize=7)
    kernels = result["kernels"]
    names = list(kernels["cpu"])
    for offset, where in enumerate(kernels):
        axes[1].bar(np.arange(len(names)) + 0.4 * offset, [kernels[where][n] for n in names], 0.4, label=where)
    axes[1].set_xticks(np.arange(len(names)) + 0.2, names)
    axes[1].set(ylabel="seconds", yscale="log", title="kernels")
    axes[1].legend()
    images = result["images"]
    axes[2].bar(list(images), list(images.values()))
    axes[2].tick_params(axis="x", labelsize=7)
    axes[2].set(ylabel="images / s", title="JPEGs decoded to 224 x 224, batches of 64")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=65_536)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--images", type=int, default=2048, help="JPEGs for the image rates")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4,096 samples, 64 JPEGs")
    args = parser.parse_args()
    args.samples = 4096 if args.tiny else args.samples
    args.images = 64 if args.tiny else args.images
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # torch's bare AssertionError else
        parser.error(f"--device {args.device}: this torch sees no CUDA device (--device cpu runs its code paths)")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": name, "torch": torch.__version__, "samples": args.samples, "loader": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for shape, dtype in (((40,), "float32"), ((3, 32, 32), "uint8")):
            print(f"loader, {dtype} {shape}, {args.samples} samples:", flush=True)
            dataset = store(Path(workdir), args.samples, shape, dtype)
            result["loader"][f"{dtype} {shape}"] = loader_rates(dataset, args.device)
            if dtype == "float32":
                print("selection round:", flush=True)
                result["round"] = selection_round(dataset, args.device)
        print(f"images, {args.images} JPEGs:", flush=True)
        result["images"] = image_rates(Path(workdir), args.images, args.device)
    print("kernels:", flush=True)
    result["kernels"] = kernel_seconds(args.device, args.samples)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "gpu.png")
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.png'}")


if __name__ == "__main__":
    main()
