"""The conversion skeleton both front ends feed: options -> front end -> trace -> write -> check.

    check the options -> the destination (TF Serving's version folder) -> the front end prepares
    the conversion (graph/front_end.py for SavedModels, keras/front_end.py for Keras models: it
    reads the source, finds and selects the sites, plans the score, and supplies the forward
    function whose gradient follows the rule) -> run the source on a probe batch -> trace the
    explainable signatures (signatures.py), recording which rule gradients were built, with the
    serving signatures and compact outputs asked for (serving/serving_signatures.py) -> save into a
    temporary sibling of the destination (write.py), with TF Serving's warm-up requests
    (serving/warmup.py) -> reload and check on the probe batch (self_check.py) -> the report
    (report.py) -> rename into place; with a serving version, a batching suggestion beside the
    versions (serving/batching.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from gbp_rewrite import conventions, rules, self_check, signatures, write
from gbp_rewrite.errors import OptionError
from gbp_rewrite.graph import front_end as graph_front_end
from gbp_rewrite.keras import front_end as keras_front_end
from gbp_rewrite.keras import loading as keras_loading
from gbp_rewrite.portable import export as portable_export
from gbp_rewrite.prepared import Options, PhaseTimer, Prepared
from gbp_rewrite.report import ConversionReport
from gbp_rewrite.serving import batching, serving_signatures, warmup

log = logging.getLogger(__name__)

def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    layers: Sequence[str] | str | None = None,
    exclude_layers: Sequence[str] | str | None = None,
    rule: str = "guided",
    signature: str = "serving_default",
    output: str | None = None,
    score: str = "logit",
    overwrite: bool = False,
    saliency_map: bool = False,
    version: int | str | None = None,
    safe_mode: bool = True,
    allow_file_ops: bool = False,
    fold_batchnorms: bool = True,
    image_bytes: bool = False,
    preprocess: str = "unit",
    saliency_map_dtype: str | None = None,
    saliency_png: bool = False,
    portable: bool = False,
    tflite: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    cam: bool = False,
    cam_layer: str | None = None,
    smooth_activations: str = rules.SMOOTH_TRUE,
) -> ConversionReport:
    """Write an explainable copy of the SavedModel `source` to `destination`.

    Args:
      source: a SavedModel directory (TF2, Keras 3 `model.export`, tf-keras `model.save`, TF1);
        or a Keras model: a keras.Model object or a .keras/.h5 file, which goes the Keras path
        (gbp_rewrite.keras.front_end: a clone with custom-gradient ReLUs, the same export and report).
      destination: the directory to create; written atomically, never half-written.
      layers: names or glob patterns of the layers whose ReLUs get the rule (default: all),
        matched against the layer path (as `inspect` prints it) or any tail of it.
      exclude_layers: names or glob patterns of layers to leave alone.
      rule: 'guided' (default), 'deconvnet' or 'vanilla'.
      signature: the signature key to explain (default 'serving_default').
      output: the output to explain when the signature has several.
      score: 'logit' (default: the pre-activation logit when the output ends in Softmax or
        Sigmoid, possibly behind reshapes or a concatenation of heads; refused when a
        Softmax/Sigmoid is followed by arithmetic) or 'probability' (the output's value; for a
        binary sigmoid, p for class 1 and 1 - p for class 0). See docs/signatures.md, "What is
        explained".
      overwrite: replace `destination` if it exists.
      saliency_map: also return `saliency_map`, [batch, H, W] float32: max |saliency| over the
        channels scaled per example to [0, 1] (image inputs [batch, H, W, C] only).
      version: write TF Serving's layout: `destination` is the model's base path and the export
        goes to `destination`/N, N = `version` (an integer) or 'next' (one more than the highest
        version there, 1 when there is none). The version folder appears complete or not at all.
      safe_mode: Keras files only: refuse unsafe deserialisation (default). False allows Lambda
        layers, whose Python code runs when the file is loaded: only for files you trust.
      allow_file_ops: SavedModels only: load and run a model whose graph reads or writes files
        (or the network) outside the standard save/restore functions (gbp_rewrite.security).
        Default False: such a model is refused before TensorFlow runs any of it.
      fold_batchnorms: SavedModels only: fold inference BatchNorms (Keras 3's `x * inv + shift`)
        into the convolution before them in the explainable graph (gbp_rewrite.graph.fold_batchnorm):
        fewer full passes over the activations forward and backward, predictions equal to float
        rounding (checked against the unfolded source). False keeps the source's arithmetic.
      image_bytes: also write the signatures `serving_bytes` and `explain_class_bytes`, which take
        encoded images (string [batch]: JPEG, PNG, BMP, GIF), decode, resize and preprocess them in
        the graph as `explain` does, and also return `image_size`
        (gbp_rewrite.serving.serving_signatures).
      preprocess: the image-bytes signatures' preprocessing: 'unit' (x/255, default), 'symmetric',
        'caffe' or 'none', as for `explain`; recorded in the report.
      saliency_map_dtype: 'float32' (default) or 'uint8' (0..255) for `saliency_map`; 'uint8'
        turns `saliency_map` on.
      saliency_png: also return `saliency_png_bytes`, each example's heat map as a PNG string (the
        picture `explain` writes as <name>_heatmap.png); turns `saliency_map` on.

      Every export carries TF Serving's warm-up requests (assets.extra/tf_serving_warmup_requests,
      with the optional extra 'serving'); with `version`, a batching_parameters.txt suggestion is
      written beside the versions (kept if it exists, unless `overwrite`).
      portable: SavedModels only: build the whole signature, gradient included, from ops that
        TFLite builtins and ONNX both have (gbp_rewrite.portable); an op without a portable
        gradient is a one-line error naming it and its layer. See docs/run-elsewhere.md.
      tflite: also write the explained signature as this .tflite file (TFLite builtins only; implies
        portable; needs the 'tflite' extra), checked in LiteRT on the probe batch.
      onnx: also write it as this .onnx file (opset 17; implies portable; needs the 'onnx' extra),
        checked by onnx.checker and in onnxruntime on the probe batch.
      cam: also return `gradcam` ([batch, H, W] float32, Grad-CAM of the explained class at the
        chosen layer, from the true gradient) and `guided_gradcam` (the saliency times gradcam);
        image inputs [batch, H, W, C] only (gbp_rewrite.cam). Not with portable, tflite or onnx
        (an OptionError): Grad-CAM's resize has no portable form.
      cam_layer: the layer Grad-CAM uses (a name, nested model, path or glob, as for `layers`;
        default: the last 4-D [batch, h, w, c] output with h, w > 1 before the explained output).
        Implies cam=True.
      smooth_activations: 'true' (default: smooth activations keep their true gradient) or
        'guided': the guided extension to smooth activations, an extension of this toolkit, not the
        published rule (docs/how-it-works.md): swish/SiLU, GELU (exact and tanh form), mish, ELU,
        SELU, softplus, sigmoid, tanh, hard_sigmoid and hard_silu pass dx = f'(x) * dy * [dy > 0]
        (the true local derivative, the guided gate on the gradient at the activation's output);
        the explained output's own Softmax/Sigmoid is left as `score` says. Only with rule
        'guided' (an OptionError otherwise); not with portable, tflite or onnx.

    Returns:
      The conversion report (also saved as assets/gbp_rewrite_report.{json,txt} in the export).

    Raises:
      GbpError: a one-line reason; the source is never modified and no destination is left behind.
    """
    started = time.perf_counter()
    signatures.check_score(score)
    rules.get_rule(rule)
    rules.check_smooth_activations(smooth_activations, rule)
    serving = serving_signatures.check_options(image_bytes=image_bytes, preprocess=preprocess,
                                               saliency_map_dtype=saliency_map_dtype, saliency_png=saliency_png)
    saliency_map = saliency_map or serving.needs_map
    portable = portable or tflite is not None or onnx is not None
    cam = cam or cam_layer is not None
    if cam and portable:  # refused before anything is read or written
        raise OptionError("--cam and --portable/--tflite/--onnx exclude each other: Grad-CAM resizes its "
                          "map with ResizeBilinear, which has no portable form; convert twice, one export "
                          "with --cam and one with --portable")
    if portable and smooth_activations != rules.SMOOTH_TRUE:
        raise OptionError("--smooth_activations guided and --portable/--tflite/--onnx exclude each other: the "
                          "portable gradients cover the ReLU rules only; convert without --smooth_activations "
                          "for a portable export")
    if portable:
        portable_export.require_extras(tflite=tflite is not None, onnx=onnx is not None)
    destination = write.version_directory(Path(destination), version)
    options = Options(layers=layers, exclude_layers=exclude_layers, rule=rule, signature=signature,
                      output=output, score=score, overwrite=overwrite, saliency_map=saliency_map,
                      serving=serving, portable=portable, tflite=None if tflite is None else Path(tflite),
                      onnx=None if onnx is None else Path(onnx),
                      cam=cam, cam_layer=cam_layer, smooth_activations=smooth_activations)
    if keras_loading.is_keras_source(source):
        prepare = keras_front_end.prepare(source, destination, options, safe_mode=safe_mode)
    else:
        prepare = graph_front_end.prepare(Path(source), destination, options, allow_file_ops=allow_file_ops,
                                          fold_batchnorms=fold_batchnorms)
    with prepare as prepared:
        report, batching_text = write_explainable(
            prepared, destination, rule=rule, score=score, overwrite=overwrite, started=started,
            serving=serving, suggest_batching=version is not None)
    if batching_text is not None:
        batching.write(destination.parent, batching_text, overwrite=overwrite)
    log.info("wrote %s: %d of %d ReLU sites rewritten with the %s rule", destination,
             len(report.rewritten), len(report.sites), rule)
    return report


def write_explainable(
    prepared: Prepared, destination: Path, *, rule: str, score: str, overwrite: bool, started: float,
    serving: serving_signatures.ServingOptions = serving_signatures.ServingOptions(),
    suggest_batching: bool = False,
) -> tuple[ConversionReport, str | None]:
    """Probe the source, trace the explainable signatures, save, self-check and report, atomically.

    Returns the report and, with `suggest_batching` (TF Serving's version layout), the text of
    batching_parameters.txt for the caller to write beside the versions."""
    plan = prepared.plan
    serving_plan = serving_signatures.make_serving_plan(plan, serving)
    serving_signatures.check_kept_signatures(prepared.kept_signatures, serving)
    phase = PhaseTimer()
    probe = self_check.probe_inputs(plan.inputs)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gbp_rewrite_probe") as pool:
        if prepared.probe_while_tracing:
            probed = pool.submit(self_check.run_probe, prepared.source_forward, plan, probe)
        else:
            with phase("probe"):
                expected = self_check.run_probe(prepared.source_forward, plan, probe)
        with rules.record_applications() as applied, phase("trace"), \
                prepared.tensorflow_errors(f"trace the explainable signature over {plan.signature_key!r}"):
            explainable = signatures.build_signatures(prepared.explained, plan, cam=prepared.cam)
            explainable = serving_signatures.add_signatures(explainable, plan, serving_plan)
        if prepared.probe_while_tracing:
            with phase("probe (rest)"):
                expected = probed.result()
    # Shown in the report (text and JSON), so the user knows why the saliency is noise.
    # The probe batch is random noise: only a head that scores every class alike is evidence here
    # (explain applies both tests to real images).
    untrained = conventions.untrained_warning(expected[plan.output_key], where="the probe batch",
                                              across_examples=False)
    checks = {"rule applied": prepared.check_applied(applied)}
    for check in prepared.after_trace:
        checks.update(check(explainable))
    checks.update(prepared.checks)
    entries = prepared.sites(applied)  # may add warnings (sites the rule did not reach)
    with write.atomic_directory(destination, overwrite=overwrite) as tmp:
        with phase("save"), prepared.tensorflow_errors("save the explainable model"):
            signatures.save(tmp, owner=prepared.owner, signatures={**prepared.kept_signatures, **explainable})
        checks["warm-up"] = warmup.write(tmp, plan, serving_plan)
        batching_text = None
        if suggest_batching:  # TF Serving's layout: suggest batching beside the versions
            with phase("batching"):
                batching_text, checks["batching"] = batching.measured_suggestion(
                    explainable[plan.signature_key], plan.inputs)
        with phase("self-check"):
            checks.update(self_check.self_check(tmp, plan=plan, probe=probe, expected=expected))
        if prepared.write_beside is not None:
            checks.update(prepared.write_beside(tmp, explainable, probe))
        report = ConversionReport.build(
            source=prepared.source, source_format=prepared.source_format, destination=destination,
            plan=plan, rule=rules.get_rule(rule), score=score, score_note=prepared.score_note,
            score_plan=prepared.score_plan,
            signatures={
                **serving_plan.signature_outputs(plan),
                **{k: sorted(fn.structured_outputs) for k, fn in prepared.kept_signatures.items()},
            },
            sites=entries, checks=checks, warnings=[*prepared.warnings, *([untrained] if untrained else [])],
            started=started, serving=serving.to_dict(),
        )
        report.write(tmp)
    return report, batching_text
