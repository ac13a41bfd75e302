"""Keras sources for the Keras path: in-memory models and .keras / .h5 files, loaded safely.

Files are loaded with Keras 3 (`keras.saving.load_model`) in Keras' safe mode unless the caller opts
out: a Lambda layer stores Python bytecode that runs while the file is loaded, so a file from an
untrusted source could run arbitrary code. Legacy .h5 files written by tf-keras (Keras 2) are read
by Keras 3's own HDF5 loader; tf-keras is never needed at run time. An .h5 file that only tf-keras
can read (tf-keras-only layers, TF-op layers) is refused with the way round: save it as a
SavedModel from tf-keras and convert that directory.

Only Sequential and functional models can be cloned layer by layer; a subclassed model is refused
with the SavedModel route (`model.export(DIR)`, then convert DIR), which rewrites every ReLU op.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any

import keras

from gbp_rewrite import tf_internals
from gbp_rewrite.errors import SourceModelError, one_line

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
UNSAFE_FLAG = "--unsafe_deserialization"

SAVEDMODEL_ROUTE = "export it with model.export(DIR) and run `gbp-rewrite convert DIR DST` instead"


@dataclasses.dataclass(frozen=True)
class KerasSource:
    """A Keras model ready for the Keras path, with where it came from."""

    model: Any  # keras.Model (Sequential or functional)
    description: str  # the path, or "<in-memory Keras model 'name'>"
    format: str  # 'keras', 'keras-h5' or 'keras-in-memory'
    path: Path | None  # the file, None for an in-memory model


def is_keras_source(source: Any) -> bool:
    """True for a path to a .keras/.h5 file, or any object (`load` says if it is no keras.Model)."""
    if not isinstance(source, (str, os.PathLike)):
        return True
    path = Path(source)
    return path.suffix.lower() in KERAS_SUFFIXES and not path.is_dir()


def _is_keras_model(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    if not module.startswith("keras") and not any(
        (c.__module__ or "").startswith("keras") for c in type(obj).__mro__
    ):
        return False
    return isinstance(obj, keras.Model)


def load(source: Any, *, safe_mode: bool = True) -> KerasSource:
    """The model in `source` (a keras.Model, or a .keras/.h5 path), checked for the Keras path."""
    _check_backend()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        model = _load_file(path, safe_mode=safe_mode)
        kind = "keras" if path.suffix.lower() == ".keras" else "keras-h5"
        result = KerasSource(model, str(path), kind, path)
    else:
        if not _is_keras_model(source):
            raise _not_a_keras_model(source)
        result = KerasSource(source, f"<in-memory Keras model '{source.name}'>", "keras-in-memory", None)
    check_supported(result.model, shown=result.description)
    return result


def _not_a_keras_model(source: Any) -> SourceModelError:
    if (type(source).__module__ or "").startswith("tf_keras"):
        return SourceModelError(
            f"{type(source).__name__} is a tf-keras (Keras 2) model; the Keras path takes Keras 3 "
            "models: save it as a SavedModel (model.save(DIR, save_format='tf')) and run "
            "`gbp-rewrite convert DIR DST`"
        )
    return SourceModelError(
        f"the source is a {type(source).__name__}, not a keras.Model, a .keras/.h5 file or a "
        "SavedModel directory"
    )


def _check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise SourceModelError(
            f"the Keras backend is {keras.backend.backend()!r}; the Keras path needs the TensorFlow "
            "backend (set KERAS_BACKEND=tensorflow)"
        )


def _load_file(path: Path, *, safe_mode: bool):
    if not path.exists():
        raise SourceModelError(f"no such file or directory: '{path}'")
    if not path.is_file():
        raise SourceModelError(f"'{path}' is not a file; a Keras model file ends in .keras or .h5")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compile-state and legacy-format chatter, not for users
            return keras.saving.load_model(str(path), compile=False, safe_mode=safe_mode)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; the user needs one line
        raise _load_error(path, e, safe_mode=safe_mode) from None


# Keras appends the whole layer config to deserialisation errors: pages of JSON, not a cause.
_CONFIG_DUMP = re.compile(r"\s*(Full object config|Received config|config=|with config|Config:).*$", re.IGNORECASE)
_MESSAGE_LIMIT = 300


def _without_config(text: str) -> str:
    """Keras' message without the layer config it appends, and at most a few hundred characters."""
    text = _CONFIG_DUMP.sub("", text).rstrip(" :,.")
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT].rstrip() + " ..."


def _load_error(path: Path, error: Exception, *, safe_mode: bool) -> SourceModelError:
    text = _without_config(one_line(error))
    if safe_mode and "safe_mode" in str(error):
        return SourceModelError(
            f"'{path}' needs unsafe deserialisation ({_first_sentence(text)}): a Lambda layer is Python "
            f"code that runs when the file is loaded; if you trust the file, pass {UNSAFE_FLAG} "
            "(Python: safe_mode=False)"
        )
    if _missing_class(text):
        # A subclassed model or a custom layer: only the code that defines it can load it.
        return SourceModelError(
            f"Keras cannot load '{path}': {text}. It holds a class defined in your code (a subclassed "
            "keras.Model or a custom layer): load it where that class is defined (or registered with "
            f"keras.saving.register_keras_serializable), then {SAVEDMODEL_ROUTE}"
        )
    if path.suffix.lower() in (".h5", ".hdf5"):
        return SourceModelError(
            f"Keras 3 cannot load '{path}': {text}. Keras 3 does not read every tf-keras .h5 file (one "
            "with DepthwiseConv2D, as in MobileNet, cannot be read): load it with tf_keras and save a "
            "SavedModel (tf_keras.models.load_model(path).save(DIR, save_format='tf')), then run "
            "`gbp-rewrite convert DIR DST`"
        )
    return SourceModelError(f"Keras cannot load '{path}': {type(error).__name__}: {text}")


def _missing_class(text: str) -> bool:
    """Keras' messages for a class it cannot find among the registered ones."""
    return any(words in text for words in (
        "Could not locate class", "Unknown layer", "Could not deserialize class", "could not be deserialized"))


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def check_supported(model: Any, *, shown: str) -> None:
    """Refuse models the Keras path cannot clone layer by layer, saying how to convert them."""
    if not isinstance(model, (tf_internals.keras_api().Functional, keras.Sequential)):
        raise SourceModelError(
            f"{shown} is a subclassed keras.Model ({type(model).__name__}); the Keras path can only "
            f"clone Sequential and functional models: {SAVEDMODEL_ROUTE}"
        )
    if not model.built or (isinstance(model, keras.Sequential) and not _has_inputs(model)):
        raise SourceModelError(
            f"{shown} has not been built, so its inputs are unknown; build it (call it on data, or "
            "start a Sequential model with keras.Input) before converting"
        )


def _has_inputs(model) -> bool:
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False
