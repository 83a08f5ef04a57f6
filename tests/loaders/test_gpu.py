"""The GPU path, where there is a GPU (bench/gpu_check.sh runs these on one; CI has none): DALI's
pipeline on the device, the user's DALI transform inside it, images decoded by nvJPEG (DALI's
"mixed" decoder), and a selection round on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from images import NUM_IMAGES, image_store

from loaders import StreamingLoader
from nearstore import Graft, RandomFeatureProxy, random_select
from nearstore.storage.images import ImageTransform

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_dali_on_the_gpu_yields_the_batches_of_the_torch_backend(id_store):
    selection = random_select(id_store, 0.3, seed=1)
    gpu = StreamingLoader(id_store, selection, batch_size=64, weights=True, backend="dali", seed=2, device="cuda")
    cpu = StreamingLoader(id_store, selection, batch_size=64, weights=True, backend="torch", seed=2, device="cpu")
    pairs = list(zip(gpu, cpu, strict=True))
    assert len(pairs) == len(cpu)
    for on_gpu, on_cpu in pairs:
        for a, b in zip(on_gpu, on_cpu, strict=True):
            assert a.device.type == "cuda"
            assert torch.equal(a.cpu(), b)


def test_the_dali_transform_runs_on_gpu_data(id_store, id_data):
    ids = [3, 700, 2499]

    def transform(x):
        assert x.device == "gpu"  # a DataNode on the device
        return x * 2 + 1

    loader = StreamingLoader(
        id_store, ids, batch_size=3, shuffle=False, backend="dali", device="cuda", dali_transform=transform
    )
    ((x, y),) = list(loader)
    assert x.device.type == "cuda"
    np.testing.assert_allclose(x.cpu().numpy(), id_data["x"][ids] * 2 + 1)
    np.testing.assert_array_equal(y.cpu().numpy(), id_data["y"][ids])


def test_a_selection_round_on_cuda_keeps_each_class_share(id_store, id_data):
    proxy = RandomFeatureProxy(5, width=32, device="cuda").fit(id_data["x"], id_data["y"])
    on_gpu = Graft(window=64).select(id_store, 0.1, proxy=proxy, device="cuda")
    assert np.bincount(id_data["y"][on_gpu.ids]).tolist() == [50] * 5
    assert len(np.unique(on_gpu.ids)) == len(on_gpu) == 250


def test_images_decoded_on_the_gpu_are_the_cpu_decoders_up_to_the_resize(tmp_path):
    store, _ = image_store(str(tmp_path / "images.zarr"))
    images = ImageTransform(size=32, train=False)

    def epoch(device: str) -> torch.Tensor:
        loader = StreamingLoader(store, batch_size=50, shuffle=False, images=images, backend="dali", device=device)
        return torch.cat([x.cpu() for x, _ in loader])

    on_gpu, on_cpu = epoch("cuda"), epoch("cpu")
    assert on_gpu.shape == on_cpu.shape == (NUM_IMAGES, 3, 32, 32)
    levels = (on_gpu - on_cpu).abs() * torch.tensor(images.std)[:, None, None]
    assert levels.mean() < 1.0 and levels.max() < 32  # nvJPEG's IDCT and the GPU resize differ a little
