"""`gbp-rewrite sanity MODEL --dir IMAGES --out DIR`: do the explanations depend on what the model learned?"""

from __future__ import annotations

import sys

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "sanity"
ARGS = ("MODEL",)
SUMMARY = ("Sanity checks (Adebayo et al. 2018) of a Keras MODEL (.keras/.h5) on the images of --dir: "
           "cascading weight randomisation from the output down and a class swap, comparing guided "
           "saliency, Grad-CAM, Guided Grad-CAM and the plain gradient (Spearman, SSIM); writes "
           "sanity.txt, sanity.json and sanity.png into --out and prints the table and a verdict per map.")
FLAG_NAMES = {"dir", "image", "out", "layers_to_randomize", "max_images", "preprocess", "cam_layer",
              "unsafe_deserialization", "json"}

flags.DEFINE_integer("layers_to_randomize", None, "sanity: how many layers with weights the cascade "
                     "randomises, from the output down (default: all).", lower_bound=1)
flags.DEFINE_integer("max_images", 8, "sanity: at most this many images (the first by name); each step "
                     "rebuilds the explanation.", lower_bound=1)


def run(model: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.sanity_checks.run import sanity

    if bool(FLAGS.image) == bool(FLAGS.dir):
        raise UsageError("'sanity' takes the images with either --image or --dir (one of them)")
    if not FLAGS.out:
        raise UsageError("'sanity' needs --out DIR, the folder for sanity.txt, sanity.json and sanity.png")
    result = sanity(
        model, FLAGS.dir if FLAGS.dir else common.split_paths(FLAGS.image), out_dir=FLAGS.out,
        layers_to_randomize=FLAGS.layers_to_randomize, max_images=FLAGS.max_images,
        preprocess=FLAGS.preprocess, cam_layer=FLAGS.cam_layer, safe_mode=not FLAGS.unsafe_deserialization,
    )
    common.emit(result)
    if not FLAGS.json:
        sys.stdout.write(f"written: {', '.join(result.files.values())}\n")
