"""Batches through a DALI pipeline: `fn.external_source` fed by a batch callable, the user's
DALI transform in the graph, torch tensors out (CPU with device_id=None, or GPU)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

try:
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
except ImportError:  # DALI has no wheel for this platform: the plain-torch path serves
    pipeline_def = None

DaliTransform = Callable[..., object]


def dali_available() -> bool:
    return pipeline_def is not None


def dali_epoch(
    batches: Iterator[Sequence[np.ndarray]],
    *,
    num_batches: int,
    num_outputs: int,
    batch_size: int,
    device: torch.device,
    dali_transform: DaliTransform | None = None,
    num_threads: int = 2,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Run one epoch of `batches` (tuples of numpy arrays, first axis the batch) through DALI.

    A fresh pipeline per epoch (building one takes ~15 ms) means an epoch abandoned half-way
    leaves nothing behind. `dali_transform` maps the first output's DataNode (the inputs) to a
    new DataNode inside the graph; on a CUDA device it receives GPU data.
    """
    if not dali_available():
        raise RuntimeError("DALI is not installed; use backend='torch' or install nvidia-dali-cuda130")

    def source(info) -> Sequence[np.ndarray]:
        # DALI prefetches past the end of the epoch: every such call must raise again.
        if info.iteration >= num_batches:
            raise StopIteration
        return next(batches)

    on_gpu = device.type == "cuda"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=(torch.cuda.current_device() if device.index is None else device.index) if on_gpu else None,
    )
    def pipeline():
        outputs = list(fn.external_source(source=source, num_outputs=num_outputs, batch=True, batch_info=True))
        if on_gpu:
            outputs = [o.gpu() for o in outputs]
        if dali_transform is not None:
            outputs[0] = dali_transform(outputs[0])
        return tuple(outputs)

    pipe = pipeline()
    pipe.build()
    stream = torch.cuda.current_stream(device) if on_gpu else None
    for _ in range(num_batches):
        yield tuple(_to_torch(tensor_list, device, stream) for tensor_list in pipe.run())


def _to_torch(tensor_list, device: torch.device, stream) -> torch.Tensor:
    """Copy a dense DALI batch into a new torch tensor (DALI reuses its buffers next run)."""
    tensor = tensor_list.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out
