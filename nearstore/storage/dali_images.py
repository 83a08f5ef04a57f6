"""Encoded images decoded by DALI: `image_graph`, an `ImageTransform` as a DALI graph (the loader's
pipelines run it on the CPU or, by nvJPEG, the GPU), and `DaliDecoder`, which runs it on the CPU
for a scan beside the data, a batch at a time through `fed_pipeline` (as the loader finds the
sample DALI refuses). DALI decodes in its own threads without the GIL, where PIL's Python
work around each small image holds it (docs/benchmarks.md#the-scan-decodes-by-dali-2026-12-07-stop-48).

DALI is imported when first used: a scan of fixed-size samples never pays for it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from nearstore.errors import ParameterError
from nearstore.storage.images import ImageTransform, damaged, jpeg_size
from nearstore.storage.ranges import batch_bounds


@functools.cache
def dali_available() -> bool:
    """Whether DALI imports here (its wheels are for Linux on x86-64 and ARM)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def image_graph(encoded, images: ImageTransform, on_gpu: bool = False):
    """The DALI graph of `images` over a DataNode of encoded images: what `ImageTransform.decode`
    does with PIL (same sizes, crops, rounding and normalization; the resize filters differ by
    about one level in 255, docs/loader.md)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    device = "mixed" if on_gpu else "cpu"
    if images.train:
        decoded = fn.decoders.image_random_crop(
            encoded,
            device=device,
            output_type=types.RGB,
            random_area=images.crop_area,
            random_aspect_ratio=(3 / 4, 4 / 3),
        )
        decoded = fn.resize(decoded, resize_x=images.size, resize_y=images.size)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        decoded = fn.decoders.image(encoded, device=device, output_type=types.RGB)
        decoded = fn.resize(decoded, resize_shorter=images.shorter_side)
        mirror = 0
    return fn.crop_mirror_normalize(
        decoded,
        crop=(images.size, images.size),
        mirror=mirror,
        mean=list(images.mean),
        std=list(images.std),
        output_layout="CHW",
        dtype=types.FLOAT,
    )


# A `draft` transform's JPEGs of more pixels than this are decoded scaled by PIL, the others whole
# by DALI (which has no scaled decode). Thumbnails of 32 x 32 of photo-like JPEGs (4:3) on 2 cores,
# ms an image by DALI whole / by PIL scaled: 96 px wide 0.09 / 0.39, 224 px 0.20 / 0.34, 288 px
# 0.29 / 0.33, 352 px 0.41 / 0.37, 448 px 0.57 / 0.40 (PIL's Python work around each image holds
# the GIL; DALI's cost follows the pixels).
DRAFT_PIXELS = 80_000


# The most stored bytes a DALI batch of the scan's holds: DALI decodes a batch whole before it
# resizes it, ~10x the bytes of a JPEG (256 thumbnails of the shapes, ~150 JPEGs of ImageNet's
# ~110 kB, 4 photographs of 4 MB, ~36 MB of pixels each).
DALI_BATCH_BYTES = 1 << 24


def dali_decodes(images: ImageTransform) -> bool:
    """Whether a scan decodes as `images` by `DaliDecoder`: an evaluation transform, where DALI is
    installed."""
    return not images.train and dali_available()


class DaliDecoder:
    """Encoded images decoded as `images` (train=False) by DALI's CPU decoder in `threads` threads,
    at most `batch` (and DALI_BATCH_BYTES stored bytes) at a time through one pipeline; returns
    what `ImageTransform.decode_batch` returns, with the pixels a loader's DALI pipeline decodes.
    On 2 cores it decoded the shapes' small JPEGs at 32 x 32 3x faster than PIL in threads,
    photographs of 500 x 375 1.6x. With `images.draft`, JPEGs of more than DRAFT_PIXELS are
    PIL's, decoded scaled (in `executor`'s threads). Samples `damaged` finds are left out unread; a
    batch DALI's decoder refuses (its error names no sample) is decoded by PIL instead, which names
    the samples it refuses."""

    def __init__(self, images: ImageTransform, threads: int, batch: int = 256, executor: Executor | None = None):
        if images.train:
            raise ParameterError(f"DaliDecoder decodes evaluation transforms (train=False), got {images}")
        self.images, self.threads, self.batch, self.executor = images, threads, batch, executor
        self._pipe = None

    def decode_batch(self, blobs: Sequence[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        """The images that decode, float32 (n_decoded, 3, size, size) in order, and why each other
        one did not, {index in blobs: reason}."""
        failed = {i: why for i, blob in enumerate(blobs) if (why := damaged(blob)) is not None}
        whole = [i for i in range(len(blobs)) if i not in failed]
        # PIL's: a draft's large JPEGs, decoded scaled, and any batch DALI's decoder refused
        by_pil = [i for i in whole if self.images.draft and _pixels(blobs[i]) > DRAFT_PIXELS]
        out = np.empty((len(blobs), 3, self.images.size, self.images.size), dtype=np.float32)
        by_dali = np.setdiff1d(whole, by_pil).tolist()
        for part in self._parts(by_dali, blobs):
            try:
                out[part] = self._run([blobs[i] for i in part])
            except RuntimeError:
                self._pipe = None  # a DALI pipeline does not outlive an error
                by_pil += part
        by_pil.sort()
        pixels, refused = self.images.decode_batch([blobs[i] for i in by_pil], executor=self.executor)
        failed.update({by_pil[j]: why for j, why in refused.items()})
        out[[i for j, i in enumerate(by_pil) if j not in refused]] = pixels
        return np.delete(out, list(failed), axis=0), dict(sorted(failed.items()))

    def _parts(self, indices: list[int], blobs: Sequence[bytes]) -> list[list[int]]:
        """`indices` in order, in batches of at most `batch` samples and DALI_BATCH_BYTES stored bytes
        (a sample larger alone): DALI holds a batch's whole decodes at once."""
        bounds = batch_bounds(np.array([len(blobs[i]) for i in indices], np.int64), self.batch, DALI_BATCH_BYTES)
        return [indices[a:b] for a, b in zip(bounds, bounds[1:])]

    def _run(self, blobs: list[bytes]) -> np.ndarray:
        if self._pipe is None:
            self._pipe = fed_pipeline(lambda encoded: image_graph(encoded, self.images), self.batch, self.threads)
        (pixels,) = run_fed(self._pipe, blobs)
        return pixels.as_array()


def fed_pipeline(graph: Callable, batch: int, threads: int):
    """A built DALI pipeline on the CPU of `graph` (a DataNode of encoded images to its outputs),
    for `run_fed`: fed a batch of at most `batch`, run on it, nothing fed or run ahead."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(
        batch_size=batch,
        num_threads=threads,
        device_id=None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def fed():
        return graph(fn.external_source(name="encoded"))

    pipe = fed()
    pipe.build()
    return pipe


def run_fed(pipe, blobs: Sequence[bytes]) -> tuple:
    """`pipe`'s outputs (`fed_pipeline`) for these encoded images; DALI's RuntimeError where it
    refuses one, after which the pipeline is spent."""
    pipe.feed_input("encoded", [np.frombuffer(blob, dtype=np.uint8) for blob in blobs])
    return pipe.run()


def _pixels(blob: bytes) -> int:
    """A JPEG's pixels; 0 for other formats, which decode whole whoever decodes them."""
    size = jpeg_size(blob)
    return size[0] * size[1] if size else 0
