"""Batches through a DALI pipeline: `fn.external_source` fed by a batch callable, encoded images
decoded and augmented in the graph (`ImageTransform`), the user's DALI transform, torch tensors
out (CPU with device_id=None, or GPU, where images are decoded by nvJPEG: `device="mixed"`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from nearstore.errors import ParameterError
from nearstore.storage.dali_images import dali_available, fed_pipeline, image_graph, run_fed
from nearstore.storage.images import ImageTransform

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.pipeline import do_not_convert
except ImportError:  # DALI has no wheel for this platform: the plain-torch path serves
    pipeline_def = None

DaliTransform = Callable[..., object]


def dali_epoch(
    batches: Iterator[Sequence[np.ndarray]],
    *,
    num_outputs: int,
    batch_size: int,
    device: torch.device,
    dali_transform: DaliTransform | None = None,
    views: int = 1,
    augmented: bool = False,
    images: ImageTransform | None = None,
    num_threads: int = 2,
    seed: int = 0,
    explain: Callable[[RuntimeError], Exception] | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Run one epoch of `batches` (tuples of numpy arrays, first axis the batch) through DALI;
    an empty batch (DALI takes none) comes out as an empty tuple in its place.

    A fresh pipeline per epoch (building one takes ~15 ms) means an epoch abandoned half-way
    leaves nothing behind. images: the first output holds encoded images (an object array of
    bytes), decoded and transformed so. `dali_transform` maps the first output's DataNode (the
    inputs, decoded) to a new DataNode inside the graph; on a CUDA device it receives GPU data.
    views: the transform's outputs in place of the first: `views` of them, each drawing its own
    random augmentations (contrastive learning's views of a sample). augmented: the last output is a
    per-sample flag (bool), and `dali_transform` applies to the flagged samples alone, by DALI's
    conditional execution (the rest pass untouched; the flags come out too). seed: the pipeline's random
    augmentations. explain: what to raise instead of a pipeline's failure (DALI's errors name no
    sample), given it.
    """
    if not dali_available():
        raise RuntimeError("DALI is not installed; use backend='torch' or install nvidia-dali-cuda130")

    # Empty batches skipped before each batch fed to DALI, in order, and after the last one; and
    # each fed batch's inputs, (dtype, a sample's shape), as the pipeline's first output must keep them.
    skipped: deque[int] = deque()
    fed: deque[tuple[torch.dtype, tuple[int, ...]]] = deque()
    trailing = 0

    def source(info) -> Sequence[np.ndarray]:
        # DALI prefetches past the end of the epoch: every such call raises again (the
        # iterator is exhausted).
        nonlocal trailing
        empty = 0
        for batch in batches:
            if len(batch[0]):
                break
            empty += 1
        else:
            trailing += empty
            raise StopIteration
        skipped.append(empty)
        if images is not None:  # DALI takes encoded samples as a list of 1-D uint8 arrays
            fed.append((torch.float32, (3, images.size, images.size)))
            batch = ([np.frombuffer(blob, dtype=np.uint8) for blob in batch[0]], *batch[1:])
        else:
            fed.append((torch.from_numpy(batch[0][:0]).dtype, tuple(batch[0].shape[1:])))
        return batch

    on_gpu = device.type == "cuda"

    conditional = augmented and dali_transform is not None

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=(torch.cuda.current_device() if device.index is None else device.index) if on_gpu else None,
        seed=seed,
        enable_conditionals=conditional,
        exec_dynamic=True,  # outputs are ours to keep: handed to torch without a copy (_to_torch)
    )
    def pipeline():
        outputs = list(fn.external_source(source=source, num_outputs=num_outputs, batch=True, batch_info=True))
        flags = outputs[-1] if conditional else None  # on the host, where DALI takes a condition
        if images is not None:  # decoded where they land: the mixed decoder takes them on the host
            outputs[0] = image_graph(outputs[0], images, on_gpu)
        if on_gpu:
            outputs = [o if i == 0 and images is not None else o.gpu() for i, o in enumerate(outputs)]
        if conditional:
            outputs[0] = on_flagged(outputs[0], flags, dali_transform)
        elif dali_transform is not None:
            outputs = [dali_transform(outputs[0]) for _ in range(views)] + outputs[1:]
        return tuple(outputs)

    pipe = pipeline()
    pipe.build()
    while True:
        try:
            outputs = pipe.run()
        except StopIteration:
            break
        except RuntimeError as error:
            if conditional and "Divergent data found" in str(error):  # flagged and not: merged, they differ
                said = _encountered(error)
                raise ParameterError(f"with augment=, dali_transform must keep x's shape and dtype: {said}") from None
            if explain is None:
                raise
            raise explain(error) from error
        yield from [()] * skipped.popleft()
        dtype, shape = fed.popleft()
        if conditional and not outputs[0].is_dense_tensor():
            shapes = sorted({tuple(sample.shape()) for sample in outputs[0]})
            raise ParameterError(f"with augment=, dali_transform must keep x's shape: a batch held shapes {shapes}")
        tensors = tuple(_to_torch(tensor_list, device) for tensor_list in outputs)
        # a batch all flagged (or none) passes DALI's merge whatever the transform made of it
        if conditional and (tensors[0].dtype != dtype or tuple(tensors[0].shape[1:]) != shape):
            raise ParameterError(
                f"with augment=, dali_transform must keep x's shape and dtype: got {tuple(tensors[0].shape[1:])} "
                f"{tensors[0].dtype} from {shape} {dtype}"
            )
        yield tensors
    yield from [()] * trailing


def on_flagged(x, flags, transform: DaliTransform):
    """`transform` of the samples of DataNode x whose flag is set, the others as they are: a
    conditional (the pipeline's `enable_conditionals`), so the transform runs on the flagged alone.
    The transform itself runs as written, as it does without flags (not rewritten by AutoGraph)."""
    if flags:
        x = do_not_convert(transform)(x)
    return x


def dali_refusal(samples: Iterable[tuple[int, bytes]]) -> tuple[int, str] | None:
    """The first (id, DALI's reason) of `samples` (id, encoded image) that DALI's CPU decoder
    refuses, decoded one at a time in a pipeline of their own; None where it decodes them all. A
    failed pipeline names no sample: this finds it where PIL decodes it (a 1-bit TIFF, say)."""

    # one sample in, its answer out
    pipe = fed_pipeline(lambda encoded: fn.decoders.image(encoded, device="cpu", output_type=types.RGB), 1, 1)
    for sample, blob in samples:
        try:
            run_fed(pipe, [blob])
        except RuntimeError as e:
            return sample, _encountered(e)
    return None


def _encountered(error: RuntimeError) -> str:
    """What a DALI pipeline met, from its error: the message is a traceback of the pipeline's
    definition, and what it met is the line after "encountered:"."""
    said = str(error).split("encountered:")[-1].strip().splitlines()
    return said[0] if said else type(error).__name__


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor, without a copy: the dynamic executor hands each run's
    outputs over rather than reusing their buffers (a copy of 64 decoded 224 × 224 images, 38 MB,
    cost ~7% of an epoch on 2 cores)."""
    with device:  # on a GPU, torch asks DALI to order its stream before the current one
        return torch.from_dlpack(tensor_list.as_tensor())
