"""Storage-side proxies: what scores a sample beside the data. A model-free stand-in for the
trainer's model (`RandomFeatureProxy`), or the trainer's own model pushed back (`ModelProxy`)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from kernels import last_layer_factors, last_layer_gradients, seeded_generator
from kernels.floats import all_finite
from kernels.label_issues import ConfidentJoint
from nearstore.errors import DatasetError, ParameterError
from nearstore.storage.images import PROXY_IMAGES, THUMBNAILS, ImageTransform
from nearstore.storage.ragged import RaggedBatch
from nearstore.storage.ranges import batch_bounds

# Ragged samples as the model-free proxy sees them: floats resampled to this many rows, integers
# (token ids) counted into this many hashed bins; and either with the log of the sample's length.
RAGGED_POINTS = 32
RAGGED_BINS = 256
# ModelProxy runs at most this many bytes of inputs at once: a model's activations grow with its
# input (the demo's image CNN holds ~15 MB an image of 224 x 224, 31 GB a chunk of 2,048 of them).
CHUNK_INPUT_BYTES = 1 << 25
# The model-free proxy's random convolutional features are computed this many images at a time.
CONV_CHUNK_IMAGES = 1024


class Proxy(Protocol):
    """What the scan needs of a proxy: gradient embeddings g_i = r_i ⊗ x_i of labelled samples
    (`embed`), or their two factors (`gradient_factors`, for selectors that need only inner
    products), p(y | x) (`confidence`), and a representation of samples without labels, h
    (`features`: what the last layer reads). images: how the scan decodes encoded images for it."""

    num_classes: int
    images: ImageTransform

    @property
    def embedding_dim(self) -> int: ...

    def embed(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor: ...

    def gradient_factors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...

    def confidence(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor: ...

    def features(self, x: np.ndarray) -> torch.Tensor: ...


def _spread(values: torch.Tensor) -> torch.Tensor:
    """Each feature's standard deviation over the samples, at least 1e-6 of the largest spread
    (where every feature is constant, or there is one sample, of the largest magnitude: not 0, as
    when the warm-up holds one sample that decodes). Relative: a floor of 1e-6 itself squashed data
    of values near 1e-8 (SI units) to nothing, and GRAFT then drew its windows at random; one of
    the magnitude squashed a signal of 1e-6 about an offset of 1000."""
    spread = values.std(0) if len(values) > 1 else torch.zeros_like(values[0])
    scale = spread.max() if spread.max() > 0 else values.abs().max()
    return spread.clamp_min(1e-6 * scale.clamp_min(torch.finfo(spread.dtype).tiny))


class RandomFeatureProxy:
    """Random ReLU features with softmax heads fitted beside the data, cross-fitted.

    h(x) = relu(W · standardize(x) / sqrt(d)), W ~ N(0, 1) fixed by `seed`; logits = A_f [h, 1].
    `fit` estimates the standardization and fits `folds` heads (L2-regularised multinomial
    logistic regression by `fit_steps` of L-BFGS: 25 cost a quarter of 100 and GRAFT selected as
    well with them on MNIST-1D) on a warm-up sample, head f on the samples outside fold f; a
    sample's fold f is a hash of its bytes (`sample_folds`), so every sample, the warm-up's too, is
    scored by a head that never saw it: a head judging the labels it was fitted on calls them right,
    and a dataset no larger than the warm-up would have no label judged at all; so judged, the
    warm-up gives each class's `held_out_recall` and `median_confidence` (round 0 trusts the
    proxy's view of which samples are typical as far as the first goes: `Graft.typical`). `embed`
    gives the last-layer gradient embeddings (softmax(z) − onehot(y)) ⊗ [h, 1] that SAGE sketches
    and scores.

    Ragged samples (a 1-D object array of arrays (L, ...), `nearstore.storage.ragged`) it sees as
    fixed-size summaries (`ragged_features`): floats resampled to 32 rows, integers (token ids) as
    a hashed bag of 256 bins; either with log(1 + L).

    Images, inputs (n, channels ≤ 4, H, W) as encoded images reach it decoded to 32 × 32 (`images`,
    JPEGs by a scaled decode: `THUMBNAILS`), get random convolutional features instead: h =
    standardize(maxpool₂ₓ₂ |W ∗ x̂|), x̂ the image normalized to zero mean and unit variance over
    its pixels, ⌈width / 4⌉ zero-mean 7 × 7 filters W ~ N(0, 1) at stride 2, the first `width`
    pooled values. The normalization drops an image's brightness and contrast, which say nothing of
    what it shows (random features need it: Coates, Lee & Ng 2011); the absolute response finds an
    edge whichever colour is in front, the pooling wherever it is. A linear head on them tells
    rendered shapes apart 68% of the time (63% unnormalized, 27% on flat random features), and
    GRAFT's round 0 over them trains a CNN 4.5 points better
    (docs/benchmarks.md#selection-on-images).
    """

    images = THUMBNAILS

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = 256,
        seed: int = 0,
        weight_decay: float = 1e-3,
        fit_steps: int = 25,
        folds: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 2:
            raise ParameterError(f"num_classes must be >= 2, got {num_classes}")
        if width < 1:
            raise ParameterError(f"width must be >= 1, got {width}")
        if folds < 1:
            raise ParameterError(f"folds must be >= 1, got {folds}")
        self.num_classes, self.width, self.seed, self.folds = num_classes, width, seed, folds
        self.weight_decay, self.fit_steps = weight_decay, fit_steps
        self.device = torch.device(device)
        self._mean: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._projection: torch.Tensor | None = None
        self._filters: torch.Tensor | None = None  # images: (ceil(width / 4), channels, 7, 7)
        self._input_shape: tuple[int, ...] = ()
        self._heads: torch.Tensor | None = None  # (folds, num_classes, width + 1), as nn.Linear weights
        # On the warm-up, each sample judged by the head that did not see it (`fit`), per class
        # (NaN where the warm-up has none): how often its label is the top class, and the median
        # p(label | x). How far the proxy is right, and which of a class's samples are typical; and
        # their confidences, from which the scan's thresholds of suspects start (`mute_suspects`).
        self.held_out_recall: np.ndarray | None = None
        self.median_confidence: np.ndarray | None = None
        self.warm_joint: ConfidentJoint | None = None

    @property
    def embedding_dim(self) -> int:
        return self.num_classes * (self.width + 1)

    def fit(self, x: np.ndarray, y: np.ndarray | None) -> RandomFeatureProxy:
        """Fit standardization and head on a warm-up sample (n, ...) with labels (n,); without
        labels (y None) the features alone, for selectors that need no labels."""
        self._mean = self._scale = self._projection = self._filters = self._heads = None
        self.held_out_recall = self.median_confidence = self.warm_joint = None
        inputs = self._inputs(x)
        labels = None if y is None else self._labels(y, len(inputs))
        generator = seeded_generator(self.seed)
        self._input_shape = tuple(inputs.shape[1:])
        if _is_images(inputs):
            filters = torch.randn(-(-self.width // 4), inputs.shape[1], 7, 7, generator=generator)
            filters -= filters.mean((1, 2, 3), keepdim=True)
            self._filters = (filters / filters.flatten(1).norm(dim=1)[:, None, None, None]).to(self.device)
            convolved = self._conv_features(inputs)
            self._mean, self._scale = convolved.mean(0), _spread(convolved)
        else:
            inputs = inputs.reshape(len(inputs), -1)
            self._mean, self._scale = inputs.mean(0), _spread(inputs)
            d = inputs.shape[1]
            self._projection = (torch.randn(d, self.width, generator=generator) / d**0.5).to(self.device)
        if labels is None:
            return self
        # images' features standardized from the convolution above, not convolved again (a tenth of
        # a round 0 over the shapes)
        h = self._with_bias(self._standardized(convolved) if self._filters is not None else self.features(x))
        folds = torch.as_tensor(sample_folds(x, self.folds), device=self.device)
        heads = []
        for fold in range(self.folds):
            outside = folds != fold
            if not outside.any():  # one fold holds the whole warm-up (one fold, or a tiny one)
                outside = torch.ones_like(outside)
            heads.append(self._fit_head(h[outside], labels[outside]))
        self._heads = torch.stack(heads)
        probs = torch.softmax(self._logits(x, h), 1)
        # the held-out confidences of every class the warm-up holds: where a store is written class
        # by class, the scan judges a sample of an early class before a later class has a threshold
        self.warm_joint = ConfidentJoint(self.num_classes)
        self.warm_joint.update(probs, labels)
        right, own = probs.argmax(1) == labels, probs.gather(1, labels[:, None])[:, 0]
        self.held_out_recall = np.full(self.num_classes, np.nan)
        self.median_confidence = np.full(self.num_classes, np.nan)
        for c in labels.unique().tolist():
            members = labels == c
            self.held_out_recall[c] = right[members].float().mean().item()
            self.median_confidence[c] = own[members].median().item()
        return self

    def _fit_head(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A (C, H + 1) weight through F.linear: MKL multiplies (n, H) by (H, 10) 2-3x slower than by its
        # transpose laid out this way (0.57 against 0.25 ms for 2,048 samples here).
        head = torch.zeros(self.num_classes, h.shape[1], device=self.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([head], max_iter=self.fit_steps, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            logits = torch.nn.functional.linear(h, head)
            value = torch.nn.functional.cross_entropy(logits, labels) + self.weight_decay * head.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        return head.detach()

    def features(self, x: np.ndarray) -> torch.Tensor:
        """Random features h(x), shape (n, width)."""
        if self._mean is None:
            raise RuntimeError("RandomFeatureProxy is not fitted; call fit(x, y) on a warm-up sample first")
        inputs = self._inputs(x)
        if self._filters is not None:
            return self._standardized(self._conv_features(inputs))
        return torch.relu_(self._standardized(inputs.reshape(len(inputs), -1)) @ self._projection)

    def _standardized(self, values: torch.Tensor) -> torch.Tensor:
        return ((values - self._mean) / self._scale).float()

    def _conv_features(self, images: torch.Tensor) -> torch.Tensor:
        """max-pooled |filters ∗ normalized images| on a 2 × 2 grid, the first `width` values, (n, width);
        CONV_CHUNK_IMAGES at a time: the responses of 8,192 thumbnails at once, 0.5 GB, were
        faulted in afresh each time, and taking their absolute value cost more than the convolution."""
        return torch.cat([self._conv_chunk(chunk) for chunk in images.split(CONV_CHUNK_IMAGES)])  # one if empty

    def _conv_chunk(self, images: torch.Tensor) -> torch.Tensor:
        images = images - images.mean((1, 2, 3), keepdim=True)  # in its own precision, then narrowed
        images = (images / images.std((1, 2, 3), keepdim=True).clamp_min(1e-6)).float()  # a flat image stays 0
        response = torch.nn.functional.conv2d(images, self._filters, stride=2, padding=3).abs_()
        return torch.nn.functional.adaptive_max_pool2d(response, 2).flatten(1)[:, : self.width]

    def logits(self, x: np.ndarray) -> torch.Tensor:
        """Each sample's logits under the head of its fold, shape (n, num_classes)."""
        return self._logits(x, self._with_bias(self.features(x)))

    def _logits(self, x: np.ndarray, biased: torch.Tensor) -> torch.Tensor:
        """The logits of samples x from their features with the bias column, [h, 1]."""
        # every head at once, (n, folds, C): a few heads cost less than a gather
        every = torch.nn.functional.linear(biased, self._heads.flatten(0, 1)).unflatten(1, (self.folds, -1))
        folds = torch.as_tensor(sample_folds(x, self.folds), device=self.device)
        return every[torch.arange(len(biased), device=self.device), folds]

    def embed(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """Last-layer gradient embeddings, shape (n, num_classes · (width + 1))."""
        biased = self._with_bias(self.features(x))  # [h, 1] once, for the logits and the gradients
        labels = self._labels(y, len(biased))
        return last_layer_gradients(self._logits(x, biased), labels, biased, bias=False)

    def gradient_factors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """embed's two factors: output residuals (n, num_classes) and [h, 1] (n, width + 1)."""
        biased = self._with_bias(self.features(x))  # [h, 1] once, for the logits and the factors
        return last_layer_factors(self._logits(x, biased), self._labels(y, len(biased)), biased, bias=False)

    def confidence(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """p(y | x) under the head of its fold, shape (n,)."""
        logits = self.logits(x)
        labels = self._labels(y, len(logits))
        return torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0]

    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        if x.dtype == object:
            x = ragged_features(x)
        x = np.asarray(x)
        # 8-byte floats and integers standardized as they are (`_standardized` narrows after): cast
        # to float32 first, a signal far below its offset (1000 + 1e-6 s) rounded to one value
        wide = x.dtype.itemsize == 8 and x.dtype.kind in "fiu"
        inputs = torch.as_tensor(x, device=self.device)
        inputs = inputs.double() if wide else inputs.float()
        if inputs.ndim == 1:
            inputs = inputs[:, None]
        if not all_finite(inputs):
            raise DatasetError("proxy input contains NaN or inf")
        if self._mean is not None and tuple(inputs.shape[1:]) != self._input_shape:
            raise DatasetError(
                f"proxy was fitted on samples of shape {tuple(self._input_shape)}, got {tuple(inputs.shape[1:])}"
            )
        return inputs

    def _labels(self, y: np.ndarray, n: int) -> torch.Tensor:
        return _labels(y, n, self.num_classes, self.device)

    @staticmethod
    def _with_bias(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], dim=1)


class ModelProxy:
    """The trainer's model as the proxy (NeSSA's feedback): z and h are the output and input of
    its head, the last `nn.Linear` it runs (or `head`), and g = (softmax(z) − onehot(y)) ⊗ [h, 1]
    that layer's per-example gradient (what the model returns is only checked: a tuple, a dict, a
    softmax or log-softmax after the head all score alike; where none of its outputs of z's shape
    is one of those, something changed the logits after the head, a learned scale, and the model
    is refused).

    The head is found by running the model (a model of one Linear needs no run): on the first
    samples it scores, or on those given to `probe` (a scan probes on its dataset's first sample);
    until then `num_classes` and `embedding_dim` answer the last registered nn.Linear's, and once
    read they stay. A model that runs two Linears on the same features last (two heads), or a
    layer with weights after its last Linear (a LayerNorm on the logits, a convolutional
    classifier), is refused unless `head` names its classifier.

    The model is scored as it is, not copied: on its own device (`device`: a copy on another), in
    eval mode for the call, each module's mode restored after, without gradients, in chunks of
    `batch_size` samples (2,048: the demo's CNN ran 1.4x faster than in chunks of 4,096 under
    glibc's default malloc, whose larger activations it maps afresh and faults in every chunk; as
    fast with freed memory kept), fewer where their inputs would pass CHUNK_INPUT_BYTES (32 MiB: 55
    images of 224 x 224, 2,048 of 32 x 32; a ragged sample counted by its own length), each moved to
    the device as it runs, on the stored samples cast to the floating dtype of the first layer with
    weights the model runs (a float16 or uint8 store to a float32 model, as the trainer casts its
    batches), integers kept as stored where that layer is an nn.Embedding or nn.EmbeddingBag (token
    ids): preprocessing the trainer does in a loader transform belongs in the model's first layer
    for its proxy to see the same input. Ragged samples reach it as the loader yields them, a jagged
    nested tensor (`nested`), floats cast so and integers (token ids) as stored. Encoded images are decoded
    by `images` (default 32 × 32, centre crop, ImageNet's normalization): give the trainer's
    evaluation transform for the model to see what it trains on (a loader's `update_proxy` gives its
    own `images` with train=False). `decodes_images`: whether its samples are such images, set by
    the scan that decodes them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 2048,
        device: torch.device | str | None = None,
        images: ImageTransform = PROXY_IMAGES,
        head: torch.nn.Linear | str | None = None,
    ) -> None:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ParameterError(
                f"ModelProxy needs a model whose last layer is nn.Linear; {type(model).__name__} has none"
            )
        if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters()):
            # sized by a head of no inputs, and the proxy's run would make the trainer's weights
            raise ParameterError(
                f"{type(model).__name__} has parameters not made yet (a Lazy layer): run it on a batch first"
            )
        if isinstance(head, str):  # by its name in the model, as a loader or a server push gives it
            head = dict(model.named_modules()).get(head, head)
        if head is not None and not any(head is m for m in linears):
            raise ParameterError(f"head must be one of the nn.Linear layers of {type(model).__name__}, got {head!r}")
        # from its tensors, not its .weight: a parametrized head's (spectral norm) computes it, and
        # in train mode steps its power iteration, changing the trainer's model
        own = _first_tensor(linears[-1]).device
        if device is not None and torch.device(device) != own:  # the trainer's model stays where it trains
            named = None if head is None else next(n for n, m in model.named_modules() if m is head)
            model = detached_copy(model).to(device)
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            head = None if named is None else model.get_submodule(named)
        self.model, self.linears = model, linears
        self.head = head or linears[-1]  # the last registered until the model runs
        self._named = head is not None  # `head` given: read wherever it runs
        self.sized = self._named or len(linears) == 1  # settled: given, the only one, run, or read
        self.dtype = _first_tensor(linears[-1]).dtype  # the head's: its outputs widen from it
        # what the stored samples are cast to, settled on the first samples run (`_settle_inputs`)
        self.input_dtype: torch.dtype | None = self.dtype
        self._inputs_settled = False
        self.device = _first_tensor(linears[-1]).device
        self.batch_size = batch_size
        self.images = images
        # set where the scan decodes them for it (`stages.probe`): only then does a misfit name `images`
        self.decodes_images = False

    @property
    def head_name(self) -> str | None:
        """The name in the model of the head given (`head`), or None where it is found by running."""
        return next(n for n, m in self.model.named_modules() if m is self.head) if self._named else None

    @property
    def num_classes(self) -> int:
        self.sized = True  # what was answered stays: a run that finds another head is refused (`_run`)
        return self.head.out_features

    @property
    def embedding_dim(self) -> int:
        return self.num_classes * (self.head.in_features + 1)

    def probe(self, x: np.ndarray) -> ModelProxy:
        """Find the head on samples x (one suffices) by running the model, for `num_classes` and
        `embedding_dim` to be its own; once the head is settled, nothing is run."""
        if not self.sized:
            self._run(x)
        return self

    def embed(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """Last-layer gradient embeddings, shape (n, num_classes · (in_features + 1))."""
        logits, features, labels = self._forward(x, y)
        return last_layer_gradients(logits, labels, features)

    def gradient_factors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """embed's two factors: output residuals (n, num_classes) and [h, 1] (n, in_features + 1)."""
        logits, features, labels = self._forward(x, y)
        return last_layer_factors(logits, labels, features)

    def confidence(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """p(y | x) under the model, shape (n,): one forward pass, no embedding."""
        logits, _, labels = self._forward(x, y)
        return torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0]

    def features(self, x: np.ndarray) -> torch.Tensor:
        """h, the head's inputs, (n, in_features): the representation, no labels needed."""
        return self._run(x)[1]

    def _forward(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, the head's inputs, labels) of a batch, checked."""
        logits, features = self._run(x)
        outputs = f" (the model's outputs) with {self._layer(self.head)} as its head (`head` names another)"
        return logits, features, _labels(y, len(x), self.num_classes, self.device, outputs)

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the head's inputs) of a batch, checked."""
        n, ragged = len(x), x.dtype == object
        if not self._inputs_settled and n:
            self._settle_inputs(x)
        # a ragged sample's bytes are its elements' in the model's dtype, as a fixed-size one's
        elements = np.fromiter((np.size(s) for s in x), np.int64, n) if ragged else np.full(n, np.prod(x.shape[1:]))
        bounds = batch_bounds(elements * self.dtype.itemsize, self.batch_size, CHUNK_INPUT_BYTES)
        spans = list(zip(bounds, bounds[1:])) or [(0, 0)]  # an empty batch runs as one empty chunk, as it did whole
        chunks = (self._tensor(x[a:b]) for a, b in spans)
        # the chunk's last Linear to run (the head given: its last run), with any other run on the
        # same input after it (a second head); only the latest held: a transformer runs hundreds
        last: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
        after: list[torch.nn.Module] = []  # a module with weights of its own started after that Linear

        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            sibling = bool(last) and args[0] is last[-1][1] and module is not last[-1][0]
            last[:] = [*last, (module, args[0], output)] if sibling else [(module, args[0], output)]
            after.clear()

        def started(module: torch.nn.Module, args: tuple) -> None:
            if last and not after:
                after.append(module)

        hooks = [linear.register_forward_hook(keep) for linear in ([self.head] if self._named else self.linears)]
        if not self._named:
            hooks += [m.register_forward_pre_hook(started) for m in self.model.modules() if _weighted(m)]
        logits, features = [], []
        with _hooked(self.model, hooks):
            for chunk in chunks:
                last.clear()
                after.clear()
                returned = self._call(chunk)
                head, h, z = self._head_of(last, after)
                if not all_finite(z):  # CREST took every sample for unlearned; the others failed unnamed
                    first = sum(len(t) for t in logits) + int((~torch.isfinite(z)).any(1).nonzero()[0, 0])
                    raise ParameterError(
                        f"{type(self.model).__name__} gives logits holding NaN or inf (the first at sample {first} "
                        f"of the {n} scored): a diverged model, or one past its dtype's range, scores nothing"
                    )
                self._check_returns(returned, head, z)
                logits.append(z)
                features.append(h)
        # half precision is too coarse for p − onehot(y) (a confident model's residuals round to 0)
        wide = torch.promote_types(self.dtype, torch.float32)
        return torch.cat(logits).to(wide), torch.cat(features).to(wide)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        """Samples on the device as the model takes them: ragged ones as the loader yields them;
        floats in `input_dtype`, integers too unless the model looks them up (token ids)."""
        chunk = self._as_stored(x)
        if self.input_dtype is None or (x.dtype == object and not chunk.is_floating_point()):  # ragged ids stay ids
            return chunk
        return chunk.to(self.input_dtype)

    def _as_stored(self, x: np.ndarray) -> torch.Tensor:
        """Samples on the device in their stored dtype: ragged ones as the loader yields them."""
        return nested(RaggedBatch.of(x), self.device) if x.dtype == object else torch.as_tensor(x, device=self.device)

    def _settle_inputs(self, x: np.ndarray) -> None:
        """Find `input_dtype` by starting the model on one sample as stored and stopping it at the
        first layer with weights it runs: an embedding lookup takes integers as stored (token
        ids: a float cast was refused, a bfloat16 one rounded 257 to 256), any other layer its
        weights' floating dtype (a bfloat16 body under a float32 head takes bfloat16). A model
        that stops before any such layer (it wants floats) is given the head's dtype. Not run
        where nothing is in doubt: float samples to a model of one floating dtype."""
        self._inputs_settled = True
        integers = x.dtype != object and x.dtype.kind in "biu"
        if not integers and len({p.dtype for p in self.model.parameters() if p.is_floating_point()}) < 2:
            return
        first: list[torch.nn.Module] = []

        def found(module: torch.nn.Module, args: tuple) -> None:
            first.append(module)
            raise _FirstLayer

        weighted = [m for m in self.model.modules() if any(True for _ in m.parameters(recurse=False))]
        try:
            with _hooked(self.model, [module.register_forward_pre_hook(found) for module in weighted]):
                self.model(self._as_stored(x[:1]))
        except Exception:  # stopped at its first layer (_FirstLayer), or it refused integers: the head's dtype
            pass
        if not first:
            return
        if isinstance(first[0], _LOOKUPS):
            self.input_dtype = None
            return
        floats = [p.dtype for p in first[0].parameters(recurse=False) if p.is_floating_point()]
        self.input_dtype = floats[0] if floats else self.dtype

    def _call(self, chunk: torch.Tensor) -> Any:
        """The model run on a chunk. A model that cannot take the encoded images `images` decodes
        for it (`decodes_images`) is told what sets their size (torch names only shapes that do not
        multiply); a failure on other samples is torch's alone, `images` not theirs to set."""
        try:
            return self.model(chunk)
        except RuntimeError as e:
            side = self.images.size
            # torch's error alone for samples not decoded here, and for a chunk too large for the device
            decoded = self.decodes_images and tuple(chunk.shape[1:]) == (3, side, side)
            if not decoded or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            raise ParameterError(
                f"{type(self.model).__name__} cannot run on samples of 3 x {side} x {side} ({type(e).__name__}: {e}); "
                f"encoded images are decoded for it at that size by ModelProxy's images, through a loader by its "
                f"images= at evaluation: give the loader images=ImageTransform(size=the model's input size)"
            ) from e

    def _head_of(
        self, last: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]], after: list[torch.nn.Module]
    ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        """The (head, its input, its output) of a chunk's run, checked; the first run settles the head."""
        model = type(self.model).__name__
        if not last:
            ran = f"did not run its head {self._layer(self.head)}" if self._named else "ran no nn.Linear"
            raise ParameterError(f"{model} {ran} on its input")
        if len(last) > 1:
            heads = ", ".join(self._layer(m) for m, _, _ in last)
            raise ParameterError(f"{model} runs {heads} last, on the same features: name its classifier with `head`")
        if after:
            raise ParameterError(
                f"{self._layer(after[0])} has weights and runs after {self._layer(last[0][0])}, the last nn.Linear "
                f"{model} runs: ModelProxy reads the logits from an nn.Linear, the last to run or named by `head`"
            )
        head, h, z = last[0]
        if not self.sized:
            self.head, self.sized = head, True
        elif (head.in_features, head.out_features) != (self.head.in_features, self.head.out_features):
            raise ParameterError(
                f"the last nn.Linear {model} runs, {self._layer(head)}, is not its head {self._layer(self.head)}, "
                "which sizes the gradients (its last registered if num_classes was read before the model ran: "
                "probe(x) first finds the head)"
            )
        return head, h, z

    def _check_returns(self, returned: Any, head: torch.nn.Module, z: torch.Tensor) -> None:
        """Refuse a head whose output is not among what the model returns, in shape (a functional
        head on the model's own parameters, which no hook sees: a hidden layer was taken for the
        classifier), or that gives more than one row of logits a sample."""
        model = type(self.model).__name__
        if z.ndim != 2:
            raise ParameterError(
                f"{self._layer(head)}, the head of {model}, gives logits of shape {tuple(z.shape)}: ModelProxy "
                "takes one row of logits a sample (pool per-position logits inside the model, before its head)"
            )
        tensors = _tensors(returned)
        shapes = [tuple(t.shape) for t in tensors]
        if shapes and tuple(z.shape) not in shapes:  # (an output of another kind is not judged)
            raise ParameterError(
                f"{model} returns {', '.join(map(str, shapes))}, not the {tuple(z.shape)} of "
                f"{self._layer(head)}, the last nn.Linear it runs: its logits come from elsewhere (F.linear on "
                "parameters of its own?); make its classifier an nn.Linear, or name it with `head`"
            )
        alike = [t for t in tensors if t.shape == z.shape and t.is_floating_point()]
        if alike and not any(_the_logits(t, z) for t in alike):
            raise ParameterError(
                f"{model} returns no {tuple(z.shape)} that gives the p(y | x) of {self._layer(head)} (as its "
                "logits, log-probabilities or probabilities): something changes the logits after it (a learned "
                "scale or bias on the model's own parameters?), and its p(y | x) would not be the model's; apply it "
                "inside the head, or name the head that gives them with `head`"
            )

    def _layer(self, module: torch.nn.Module) -> str:
        """A module as errors name it: 'body.0' (Linear 6 -> 12)."""
        name = next((n for n, m in self.model.named_modules() if m is module), "")
        shape = f" {module.in_features} -> {module.out_features}" if isinstance(module, torch.nn.Linear) else ""
        return f"{name or type(self.model).__name__!r} ({type(module).__name__}{shape})"


def nested(batch: RaggedBatch, device: torch.device | str) -> torch.Tensor:
    """A batch of ragged samples as a jagged nested tensor (B, j, *row_shape) on `device`: its
    `.values()` are every row, its `.offsets()` where each sample starts, and
    `.to_padded_tensor(pad)` pads them to the longest."""
    lengths = np.diff(batch.offsets)
    return torch.nested.nested_tensor_from_jagged(
        torch.from_numpy(batch.values).to(device),
        torch.from_numpy(batch.offsets).to(device),
        min_seqlen=int(lengths.min()),
        max_seqlen=int(lengths.max()),
    )


def ragged_features(samples: np.ndarray) -> np.ndarray:
    """Fixed-size summaries of ragged samples (a 1-D object array of arrays (L, ...)), float32
    (float64 for float64 samples): floats (signals, audio, points) resampled by linear
    interpolation to RAGGED_POINTS rows, integers (token ids) counted into RAGGED_BINS hashed bins
    over L; each with log(1 + L). An empty sample summarises to zeros and log 1."""
    batch = RaggedBatch.of(list(samples))
    rows = batch.values.reshape(len(batch.values), -1)
    lengths = np.diff(batch.offsets)
    n, width = len(batch), rows.shape[1]
    dtype = np.float64 if rows.dtype == np.float64 else np.float32
    if np.issubdtype(rows.dtype, np.floating):
        # RAGGED_POINTS evenly spaced positions along each sample, each between two of its rows
        at = np.linspace(0, 1, RAGGED_POINTS)[None] * np.maximum(lengths - 1, 0)[:, None]
        low = np.floor(at).astype(np.int64)
        high = np.minimum(low + 1, np.maximum(lengths - 1, 0)[:, None])
        share = (at - low)[..., None].astype(dtype)
        first = batch.offsets[:-1, None]
        empty = lengths == 0
        padded = np.concatenate([rows.astype(dtype), np.zeros((1, width), dtype)])
        low, high = (np.where(empty[:, None], len(rows), first + k) for k in (low, high))
        summary = ((1 - share) * padded[low] + share * padded[high]).reshape(n, -1)
    else:
        tokens = rows.astype(np.int64).ravel()
        owner = np.repeat(np.arange(n), lengths * width)
        with np.errstate(over="ignore"):
            bins = (tokens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(56)
        counts = np.bincount(owner * RAGGED_BINS + bins.astype(np.int64), minlength=n * RAGGED_BINS)
        summary = counts.reshape(n, RAGGED_BINS) / np.maximum(lengths * width, 1)[:, None]
    return np.concatenate([summary, np.log1p(lengths)[:, None]], axis=1).astype(dtype)


def _tensors(returned: Any) -> list[torch.Tensor]:
    """The tensors a model returned: itself, or those of a tuple, a list or a dict's values."""
    if isinstance(returned, torch.Tensor):
        return [returned]
    if isinstance(returned, Mapping):
        returned = list(returned.values())
    if isinstance(returned, list | tuple):
        return [t for item in returned for t in _tensors(item)]
    return []


@contextlib.contextmanager
def _hooked(model: torch.nn.Module, hooks: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Run `model` in eval mode without gradients; after, `hooks` removed and each module's mode
    restored (the trainer's model is scored as it is, not copied)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training


class _FirstLayer(Exception):
    """Stops a model at the first layer with weights it runs (`ModelProxy._settle_inputs`)."""


# Layers that look their inputs up (token ids), rather than compute on them.
_LOOKUPS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def _the_logits(returned: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether what a model returns gives its head's p(y | x): as logits (z, shifted or centred a
    row, a log-softmax, a log of probabilities) or as the probabilities themselves, to the precision
    of their dtype. A learned scale or bias after the head changes them."""
    p = torch.softmax(z.detach().double(), 1)
    got = returned.detach().double()
    tolerance = 1e-3 if z.dtype.itemsize >= 4 else 3e-2
    return any(bool(((q - p).abs() <= tolerance).all()) for q in (torch.softmax(got, 1), got))


def _first_tensor(module: torch.nn.Module) -> torch.Tensor:
    """A layer's first parameter, as stored (its weight's original where parametrized)."""
    return next(module.parameters())


def _weighted(module: torch.nn.Module) -> bool:
    """Whether a module other than nn.Linear holds parameters or buffers of its own."""
    own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return bool(own) and not isinstance(module, torch.nn.Linear)


def _is_images(inputs: torch.Tensor) -> bool:
    """Samples (channels ≤ 4, H, W) of at least 7 × 7 pixels: images, channels first (as decoded)."""
    return inputs.ndim == 4 and inputs.shape[1] <= 4 and min(inputs.shape[2:]) >= 7


# Odd 64-bit multipliers of a sample's 8-byte words: a multiply-add hash, the same on every machine.
_HASH = np.random.default_rng(20261204).integers(1, 2**63, size=1 << 12, dtype=np.uint64) | np.uint64(1)


def sample_folds(x: np.ndarray, folds: int) -> np.ndarray:
    """Each sample's fold in [0, folds): a hash of its bytes, so a sample (and any exact copy of
    it) lands in the same fold wherever and whenever it is read; shape (n,)."""
    if x.dtype == object:  # ragged samples: each one's bytes digested to 8
        digests = [hashlib.blake2b(np.ascontiguousarray(s).tobytes(), digest_size=8).digest() for s in x]
        x = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(len(x), 1)
    rows = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
    rows = np.pad(rows, ((0, 0), (0, -rows.shape[1] % 8))).view(np.uint64)
    if rows.shape[1] > len(_HASH):  # long samples: their words folded onto the multipliers by xor
        rows = np.pad(rows, ((0, 0), (0, -rows.shape[1] % len(_HASH))))
        rows = np.bitwise_xor.reduce(rows.reshape(len(rows), -1, len(_HASH)), axis=1)
    with np.errstate(over="ignore"):
        mixed = (rows * _HASH[: rows.shape[1]]).sum(1, dtype=np.uint64)
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(folds)).astype(np.int64)


def _labels(y: np.ndarray, n: int, num_classes: int, device: torch.device, outputs: str = "") -> torch.Tensor:
    """Labels of n samples as a long tensor, checked to lie in [0, num_classes)."""
    labels = torch.as_tensor(np.asarray(y), device=device).long().reshape(-1)
    if len(labels) != n:
        raise DatasetError(f"got {len(labels)} labels for {n} samples")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"labels must lie in [0, {num_classes}){outputs}, got [{labels.min()}, {labels.max()}]")
    return labels


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The trainer's own model inside DataParallel or DistributedDataParallel (`.module`) and
    torch.compile (`._orig_mod`): what a server builds from its factory, whose state_dict's keys
    carry no wrapper's prefix."""
    while True:
        if isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def nonfinite_weight(model: torch.nn.Module) -> str | None:
    """The name of the first of the model's parameters holding NaN or inf, or None: a diverged
    model's scores are NaN, which no round can use. Buffers are not judged (a causal mask of -inf
    is meant; non-finite logits are refused as they come, `ModelProxy`)."""
    return next(
        (key for key, t in model.named_parameters() if t.is_floating_point() and not torch.isfinite(t).all()),
        None,
    )


def detached_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` to score while training goes on with the original. A tensor a
    module keeps from its last forward (legacy weight_norm's weight, a cached activation) is part
    of autograd's graph, which deepcopy refuses: such tensors are copied detached."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
