"""A RunInference model handler for explainable exports (`gbp-rewrite convert`'s output).

Why not Beam's stock TFModelHandlerTensor/Numpy (apache_beam.ml.inference.tensorflow_inference):
that module imports tensorflow_hub (not a dependency of ours), loads with
tf.keras.models.load_model, which Keras 3 refuses for a SavedModel directory, and calls
`model(batch)`, whereas an explainable export is run through a named signature with a keyword
input (and `explain_class` with a class index). This handler loads the export with `explain`'s
loader (its checks and security scan included), decodes each file's bytes with `explain`'s decoder
and calls the model as `explain` does, so the numbers are `gbp-rewrite explain`'s.

RunInference keeps one loaded model per worker process, shared by its threads (Beam's
`shared.Shared`); `large_model=True` shares one across the processes of a machine instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from gbp_rewrite.pictures import explainer, images

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One image explained: the class, the explained output's value there, the saliency [H, W, 3]."""

    class_index: int
    score: float
    saliency: np.ndarray


@dataclasses.dataclass(frozen=True)
class Refusal:
    """One image that could not be explained, and why (the reason `explain` gives)."""

    reason: str


class LoadedModel:
    """What a worker holds: the explainable export, with `explain`'s decoder and model call.

    Methods only, taking and returning picklable values: with `large_model`, RunInference hands
    run_inference a proxy of this object living in another process."""

    def __init__(self, model: explainer.ExplainableModel, *, preprocess: str, grayscale_to_rgb: bool):
        self._model = model
        self._preprocess = preprocess
        self._grayscale_to_rgb = grayscale_to_rgb

    def decode(self, batch: Sequence[bytes]) -> list[np.ndarray | Refusal]:
        """The model's pixels for each file's bytes, or why that file cannot be explained."""
        decoded: dict[int, np.ndarray | Refusal] = {}
        for chunk in images.encoded_dataset(batch, spec=self._model.spec, mode=self._preprocess,
                                            batch_size=len(batch)):
            for index, pixels, channels in zip(chunk["index"].numpy(), chunk["pixels"].numpy(),
                                               chunk["channels"].numpy()):
                problem = images.channel_problem(int(channels), grayscale_to_rgb=self._grayscale_to_rgb)
                decoded[int(index)] = Refusal(problem) if problem else pixels
        # A file the stream dropped did not decode: say why, as `explain` does.
        return [decoded[n] if n in decoded else Refusal(images.diagnose_encoded(encoded))
                for n, encoded in enumerate(batch)]

    def explain(self, pixels: np.ndarray, class_index: int | None) -> list[Explanation]:
        """One model call (`explain`'s) on a batch of pixels: an Explanation per image."""
        outputs = self._model.run(pixels, class_index)
        return [Explanation(*explainer.explained_values(self._model, outputs, n)) for n in range(len(pixels))]


class ExplainableModelHandler(ModelHandler[bytes, PredictionResult, LoadedModel]):
    """An image file's bytes in, PredictionResult(bytes, Explanation or Refusal with the reason) out.

    Per batch, as `explain` does per batch: decode and preprocess each file (the same
    gbp_rewrite.pictures.images functions), refuse the undecodable and grey-scale ones, and run the model
    once on the others.

    Args:
      model_dir: an explainable export: a local directory or any path Beam's FileSystems reads
        (gs://, s3://, ...), which is copied to a local temporary directory on each worker.
      preprocess: 'unit', 'symmetric', 'caffe' or 'none', as for `explain`.
      class_index: explain this class in every image (the `explain_class` signature) instead of
        each image's top class.
      batch_size: images per model call (RunInference batches up to this many).
      grayscale_to_rgb: explain grey-scale images as RGB (otherwise they are refused).
      allow_file_ops: as for `explain`: run a model whose graph reaches files or the network.
      large_model: one model per machine, shared across processes (for models that do not fit
        in memory once per process); by default one per worker process.
    """

    def __init__(self, model_dir: str, *, preprocess: str = "unit", class_index: int | None = None,
                 batch_size: int = 32, grayscale_to_rgb: bool = False, allow_file_ops: bool = False,
                 large_model: bool = False):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size, large_model=large_model)
        self._model_dir = str(model_dir)
        self._preprocess = images.check_preprocess(preprocess)
        self._class_index = class_index
        self._grayscale_to_rgb = grayscale_to_rgb
        self._allow_file_ops = allow_file_ops

    def load_model(self) -> LoadedModel:
        model = explainer.load_model(local_model_dir(self._model_dir), allow_file_ops=self._allow_file_ops)
        explainer.check_class(model, self._class_index)
        return LoadedModel(model, preprocess=self._preprocess, grayscale_to_rgb=self._grayscale_to_rgb)

    def run_inference(self, batch: Sequence[bytes], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        results: list[Explanation | Refusal | None] = []
        good: list[tuple[int, np.ndarray]] = []  # (slot in results, pixels)
        for decoded in model.decode(batch):
            if isinstance(decoded, Refusal):
                results.append(decoded)
            else:
                good.append((len(results), decoded))
                results.append(None)
        if good:
            explained = model.explain(np.stack([pixels for _, pixels in good]), self._class_index)
            for (slot, _), explanation in zip(good, explained):
                results[slot] = explanation
        return [PredictionResult(encoded, outcome, self._model_dir) for encoded, outcome in zip(batch, results)]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(encoded) for encoded in batch)

    def get_metrics_namespace(self) -> str:
        return "gbp_rewrite"


def local_model_dir(model_dir: str) -> str:
    """`model_dir` itself when it is local, else a local copy made through Beam's FileSystems."""
    if FileSystems.get_scheme(model_dir) in (None, "file"):
        return model_dir
    root = model_dir.rstrip("/") + "/"
    local = tempfile.mkdtemp(prefix="gbp_rewrite_model_")
    files = [m.path for result in FileSystems.match([root + "**"]) for m in result.metadata_list]
    for path in files:
        target = os.path.join(local, path[len(root):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as source, \
                open(target, "wb") as copy:
            copy.write(source.read())
    log.info("copied %d file(s) of %s to %s", len(files), model_dir, local)
    return local
