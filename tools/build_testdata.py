"""Builds the test data: a small shapes CNN, exported, plus sample images.

Usage (from the repository root):

    .venv/bin/python tools/build_testdata.py --out testdata

Writes, overwriting any previous build:

    <out>/shapes_cnn/           TF SavedModel from Keras 3 `model.export`
                                (signature `serving_default`).
    <out>/shapes_cnn.keras      The same model as a Keras file, without
                                optimizer state (keeps it small).
    <out>/shapes_cnn.json       Metadata: class names, input scaling,
                                accuracies, seeds, rebuild command.
    <out>/shapes_cnn_labels.txt The class names, one per line in class
                                order (`explain --labels`).
    <out>/images/<class>_<k>.png        Held-out sample images.
    <out>/images/masks/<class>_<k>.png  Their shape masks (0 or 255, grey).
    <out>/images/labels.json            File name -> class name and index.

Data, initial weights and training are all seeded, and TF op determinism is
on, so a rebuild with the same library versions reproduces the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Quieten TF's C++ start-up logging; must be set before TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

TOOLS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TOOLS_DIR.parent
sys.path.insert(0, str(TOOLS_DIR))
import shapes  # noqa: E402

MODEL_NAME = "shapes_cnn"
LABELS_FILE = f"{MODEL_NAME}_labels.txt"
REBUILD_COMMAND = "python tools/build_testdata.py --out testdata"

# Distinct seeds so the training, held-out and verification sets never share
# a random stream.
SEEDS = {
    "train_data": 1,
    "heldout_data": 2,
    "verification_data": 3,
    "keras": 42,
}
NUM_TRAIN = 10000
NUM_HELDOUT = 1000
NUM_VERIFICATION = 1000
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
MIN_ACCURACY = 0.95
SAMPLES_PER_CLASS = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "testdata",
        help="output directory (default: <repo>/testdata)",
    )
    return parser.parse_args(argv)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Scales uint8 images to the float32 [0, 1] range the model expects."""
    return images.astype(np.float32) / 255.0


def build_model() -> keras.Model:
    """The small functional CNN; layer names are part of the test contract."""
    inputs = keras.Input(shape=(32, 32, 3), dtype="float32", name="image")
    # A 5x5 first kernel sees enough of a corner or curve to tell small
    # squares from small circles.
    x = keras.layers.Conv2D(16, 5, activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(
        len(shapes.CLASS_NAMES), activation="softmax", name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=MODEL_NAME)


def train_model(train: tuple[np.ndarray, np.ndarray]) -> keras.Model:
    """Builds and trains the CNN on (images, labels)."""
    images, labels = train
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        to_model_input(images),
        labels,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        shuffle=True,
        verbose=2,
    )
    return model


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max matches the label."""
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled copy of `model`, so saving it stores no optimizer state.

    (`keras.models.clone_model` would re-compile the copy, and Keras 3's
    `save` has no `include_optimizer` switch.)
    """
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def describe_signature(signature) -> dict:
    """JSON-friendly {inputs, outputs} of a concrete serving function."""

    def spec_dict(spec: tf.TensorSpec) -> dict:
        return {"shape": spec.shape.as_list(), "dtype": spec.dtype.name}

    _, input_specs = signature.structured_input_signature
    return {
        "inputs": {key: spec_dict(spec) for key, spec in sorted(input_specs.items())},
        "outputs": {
            key: spec_dict(spec) for key, spec in sorted(signature.structured_outputs.items())
        },
    }


def serving_probabilities(signature, images: np.ndarray) -> np.ndarray:
    """Runs a single-input, single-output serving signature on uint8 images."""
    _, input_specs = signature.structured_input_signature
    (input_key,) = input_specs
    outputs = signature(**{input_key: tf.constant(to_model_input(images))})
    (probabilities,) = outputs.values()
    return probabilities.numpy()


def write_samples(images_dir: Path, heldout: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Writes the first SAMPLES_PER_CLASS held-out images of each class as PNG."""
    images, labels, masks = heldout
    masks_dir = images_dir / "masks"
    masks_dir.mkdir(parents=True)
    index = {}
    for class_index, class_name in enumerate(shapes.CLASS_NAMES):
        chosen = np.flatnonzero(labels == class_index)[:SAMPLES_PER_CLASS]
        for k, example in enumerate(chosen):
            file_name = f"{class_name}_{k}.png"
            mask_grey = masks[example, :, :, None].astype(np.uint8) * 255
            (images_dir / file_name).write_bytes(tf.io.encode_png(images[example]).numpy())
            (masks_dir / file_name).write_bytes(tf.io.encode_png(mask_grey).numpy())
            index[file_name] = {
                "class_name": class_name,
                "class_index": class_index,
                "mask": f"masks/{file_name}",
            }
    (images_dir / "labels.json").write_text(json.dumps(index, indent=2) + "\n")


def replace_path(staged: Path, final: Path) -> None:
    """Moves `staged` to `final`, replacing whatever (file or dir) was there."""
    if final.is_dir() and not final.is_symlink():
        # os.replace cannot overwrite a non-empty directory: move the old one
        # aside first, then delete it once the new one is in place.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)


def build(out_dir: Path) -> dict:
    """Trains, exports, verifies and writes everything into out_dir."""
    keras.utils.set_random_seed(SEEDS["keras"])
    tf.config.experimental.enable_op_determinism()

    train_images, train_labels, _ = shapes.make_dataset(NUM_TRAIN, seed=SEEDS["train_data"])
    heldout = shapes.make_dataset(NUM_HELDOUT, seed=SEEDS["heldout_data"])
    verification_images, verification_labels, _ = shapes.make_dataset(
        NUM_VERIFICATION, seed=SEEDS["verification_data"]
    )

    start = time.monotonic()
    model = train_model((train_images, train_labels))
    training_seconds = time.monotonic() - start

    heldout_images, heldout_labels, _ = heldout
    keras_probabilities = model.predict(to_model_input(heldout_images), verbose=0)
    heldout_accuracy = accuracy(keras_probabilities, heldout_labels)
    print(f"held-out accuracy: {heldout_accuracy:.4f} (training took {training_seconds:.1f} s)")
    if heldout_accuracy <= MIN_ACCURACY:
        raise AssertionError(f"held-out accuracy {heldout_accuracy:.4f} <= {MIN_ACCURACY}")

    out_dir.mkdir(parents=True, exist_ok=True)
    # Stage inside out_dir so the final renames stay on one file system.
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        staged_export = staging / MODEL_NAME
        model.export(str(staged_export), verbose=False)
        inference_copy(model).save(staging / f"{MODEL_NAME}.keras")
        write_samples(staging / "images", heldout)

        # Check the artefacts as consumers will load them.
        signature = tf.saved_model.load(str(staged_export)).signatures["serving_default"]
        exported_probabilities = serving_probabilities(signature, heldout_images)
        np.testing.assert_allclose(exported_probabilities, keras_probabilities, atol=1e-5)
        verification_accuracy = accuracy(
            serving_probabilities(signature, verification_images), verification_labels
        )
        print(f"SavedModel accuracy on fresh data (seed {SEEDS['verification_data']}): "
              f"{verification_accuracy:.4f}")
        if verification_accuracy <= MIN_ACCURACY:
            raise AssertionError(f"verification accuracy {verification_accuracy:.4f} <= {MIN_ACCURACY}")
        reloaded = keras.models.load_model(staging / f"{MODEL_NAME}.keras")
        np.testing.assert_allclose(
            reloaded.predict(to_model_input(heldout_images), verbose=0),
            keras_probabilities,
            atol=1e-5,
        )

        described = describe_signature(signature)
        (input_name, input_spec), = described["inputs"].items()
        metadata = {
            "model": MODEL_NAME,
            "class_names": list(shapes.CLASS_NAMES),
            "input": {
                "name": input_name,
                **input_spec,  # shape and dtype, as exported
                "scaling": "unit",
                "scaling_formula": "x / 255",
            },
            "layers": [layer.name for layer in model.layers],
            "serving_default": described,
            "heldout_accuracy": round(heldout_accuracy, 4),
            "verification_accuracy": round(verification_accuracy, 4),
            "num_train": NUM_TRAIN,
            "num_heldout": NUM_HELDOUT,
            "num_verification": NUM_VERIFICATION,
            "epochs": EPOCHS,
            "seeds": SEEDS,
            "rebuild_command": REBUILD_COMMAND,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        }
        (staging / f"{MODEL_NAME}.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / LABELS_FILE).write_text("".join(f"{name}\n" for name in shapes.CLASS_NAMES))

        for name in (MODEL_NAME, f"{MODEL_NAME}.keras", "images", f"{MODEL_NAME}.json", LABELS_FILE):
            replace_path(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    metadata = build(args.out.resolve())
    print(json.dumps(metadata["serving_default"], indent=2))


if __name__ == "__main__":
    main()
