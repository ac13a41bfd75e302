"""The graph path: any SavedModel in, an explainable SavedModel out.

    read saved_model.pb -> find the ReLU sites the signature depends on -> select them ->
    set `_gradient_op_type` on their NodeDefs in a private copy -> load the copy -> trace the
    explainable signatures (forward + rule gradient), while another thread runs the source on a
    probe batch -> save into a temporary sibling of the destination -> reload and check on the
    probe batch -> rename into place.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from gbp_rewrite import cam as cam_maps
from gbp_rewrite import explainable, export, keras_loading, rules, savedmodel, security, sites, validation, verify
from gbp_rewrite.errors import OptionError, SignatureError
from gbp_rewrite.report import ConversionReport, SiteEntry

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
    cam: bool = False,
    cam_layer: str | None = None,
) -> ConversionReport:
    """Write an explainable copy of the SavedModel `source` to `destination`.

    Args:
      source: a SavedModel directory (TF2, Keras 3 `model.export`, tf-keras `model.save`, TF1);
        or a Keras model: a keras.Model object or a .keras/.h5 file, which goes the Keras path
        (gbp_rewrite.keras_path: a clone with custom-gradient ReLUs, the same export and report).
      destination: the directory to create; written atomically, never half-written.
      layers: names or glob patterns of the layers whose ReLUs get the rule (default: all).
      exclude_layers: names or glob patterns of layers to leave alone.
      rule: 'guided' (default), 'deconvnet' or 'vanilla'.
      signature: the signature key to explain (default 'serving_default').
      output: the output to explain when the signature has several.
      score: 'logit' (default; the pre-softmax logit when the output ends in Softmax) or
        'probability' (the softmax value itself).
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
        into the convolution before them in the explainable graph (gbp_rewrite.fold_batchnorm):
        fewer full passes over the activations forward and backward, predictions equal to float
        rounding (checked against the unfolded source). False keeps the source's arithmetic.
      cam: also return `gradcam` ([batch, H, W] float32, Grad-CAM of the explained class at the
        chosen layer, from the true gradient) and `guided_gradcam` (the saliency times gradcam);
        image inputs [batch, H, W, C] only (gbp_rewrite.cam).
      cam_layer: the layer Grad-CAM uses (a name, nested model, path or glob, as for `layers`;
        default: the last 4-D [batch, h, w, c] output with h, w > 1 before the explained output).
        Implies cam=True.

    Returns:
      The conversion report (also saved as assets/gbp_rewrite_report.{json,txt} in the export).

    Raises:
      GbpError: a one-line reason; the source is never modified and no destination is left behind.
    """
    if keras_loading.is_keras_source(source):
        from gbp_rewrite import keras_path  # imported here: it needs Keras, the graph path does not

        return keras_path.convert(
            source, destination, layers=layers, exclude_layers=exclude_layers, rule=rule,
            signature=signature, output=output, score=score, overwrite=overwrite,
            saliency_map=saliency_map, version=version, safe_mode=safe_mode, cam=cam, cam_layer=cam_layer,
        )
    started = time.perf_counter()
    explainable.check_score(score)
    rule_obj = rules.get_rule(rule)
    source, destination = Path(source), Path(destination)
    destination = export.version_directory(destination, version)
    model = savedmodel.read(source)
    file_op_warnings = security.check(security.find_file_ops(model.meta_graph), allow=allow_file_ops,
                                      source=source)
    export.check_destination(destination, source=source, overwrite=overwrite)
    signature_desc = model.signature(signature)
    cam = cam or cam_layer is not None
    plan = explainable.make_plan(signature, signature_desc.inputs, signature_desc.outputs, output=output,
                                 saliency_map=saliency_map, cam=cam)
    found = sites.find_sites(model.meta_graph, [d.tensor_name for d in signature_desc.outputs.values()])
    selection = sites.select(found, layers=layers, exclude_layers=exclude_layers)
    softmax, score_note = _softmax_plan(model, plan, score)

    patches = {s.key: rules.gradient_op_type(rule, s.op_type) for s in selection.selected_sites}
    if softmax is not None:
        patches[softmax.key] = rules.SOFTMAX_PASS_THROUGH
    rules.register_graph_gradients()
    phase = _PhaseTimer()
    fold_signature = signature if fold_batchnorms else None
    with savedmodel.patched_copy(model, patches, fold_signature=fold_signature) as patched:
        with phase("load"):
            loaded = savedmodel.load(patched.path, tags=model.tags, source=source)
        validation.check_loaded_signatures(loaded, model.signature_keys(), source=source)
        plan = validation.reconcile_plan(plan, loaded.signatures[signature], source=source)  # no abort
        probe = verify.probe_inputs(plan.inputs)
        # The predictions to match are the source's own (unfolded) signature's; the explainable
        # signature is traced over the folded twin when there is one.
        source_signature = loaded.signatures[signature]
        source_fn = loaded.signatures[patched.folded_signature or signature]
        # The probe runs in TensorFlow's C++ runtime while this thread traces in Python: on a
        # large network that hides most of the probe's time.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gbp_rewrite_probe") as pool:
            probed = pool.submit(verify.run_probe, lambda inputs: source_signature(**inputs), plan, probe)
            with rules.record_applications() as applied, phase("trace"), \
                    validation.tensorflow_errors(f"trace the explainable signature over {signature!r}", source=source):
                if cam:  # the forward ops inline, so the chosen layer's activation is at hand
                    cam_options = cam_maps.graph_options(model.meta_graph, cam_layer)
                    forward = cam_maps.inline_forward(source_fn, list(plan.outputs),
                                                      variables=explainable.variables_of(loaded))
                    signatures = explainable.build_signatures(forward, plan, cam=cam_options)
                    checks_cam = {"grad-cam layer": cam_options.chosen.describe()}
                else:
                    signatures = explainable.build_signatures(lambda inputs: source_fn(**inputs), plan)
                    checks_cam = {}
            with phase("probe (rest)"):
                expected = probed.result()
        checks = {"rule applied": _check_applied(selection, softmax, applied, rule), **checks_cam}
        if patched.folded_batchnorms:
            checks["batchnorm folding"] = (
                f"{len(patched.folded_batchnorms)} BatchNorms folded into the convolutions before them "
                "(fewer passes over the activations; predictions compared with the unfolded source below)"
            )
        extra = _kept_signatures(model, loaded, signature)
        with export.atomic_directory(destination, overwrite=overwrite) as tmp:
            with phase("save"), validation.tensorflow_errors("save the explainable model", source=source):
                explainable.save(tmp, owner=loaded, signatures={**extra, **signatures})
            with phase("self-check"):
                checks.update(verify.self_check(tmp, plan=plan, probe=probe, expected=expected))
            report = ConversionReport.build(
                source=str(source), source_format=model.format, destination=destination, plan=plan,
                rule=rule_obj, score=score, score_note=score_note,
                signatures={
                    signature: plan.output_keys(),
                    explainable.EXPLAIN_CLASS_SIGNATURE: plan.output_keys(),
                    **{k: sorted(fn.structured_outputs) for k, fn in extra.items()},
                },
                sites=[SiteEntry.from_site(s, selection.status(s)) for s in found], checks=checks,
                warnings=file_op_warnings, started=started,
            )
            report.write(tmp)
    log.info("wrote %s: %d of %d ReLU sites rewritten with the %s rule", destination,
             len(report.rewritten), len(report.sites), rule)
    return report


class _PhaseTimer:
    """Logs how long each phase of a conversion takes (visible with --verbose)."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            log.info("%s: %.1f s", name, time.perf_counter() - started)


def _softmax_plan(model: savedmodel.SavedModelFile, plan: explainable.ExplainPlan, score: str):
    """The Softmax to give a pass-through gradient (score 'logit'), and a note for the report."""
    producer = sites.find_output_producer(model.meta_graph, plan.explained.tensor_name)
    ends_in_softmax = producer is not None and producer.op_type == "Softmax"
    last_op = producer.op_type if producer is not None else "an op that could not be traced"
    if score == "logit":
        if ends_in_softmax:
            return producer, f"pre-softmax logit: Softmax '{producer.node}' passes the gradient through"
        return None, f"the output ends in {last_op}, not Softmax: its value is the score"
    if not ends_in_softmax:
        raise OptionError(
            f"--score probability needs an output that ends in Softmax, but {plan.output_key!r} ends "
            f"in {last_op}; its value already is the score, use --score logit"
        )
    return None, "softmax probability with the true softmax gradient"


def _site_key(site: sites.Site) -> str:
    """The key the site's gradient is recorded under (savedmodel sets it as rules.SITE_ATTR)."""
    return rules.site_key(site.function, site.node)


def _check_applied(selection: sites.Selection, softmax: sites.Site | None, applied: set[str], rule: str) -> str:
    """Prove the rule reached the graph: an ignored attr would leave the plain gradient."""
    return verify.check_applied(
        selection.selected_sites, _site_key, applied, rule,
        softmax=None if softmax is None else (_site_key(softmax), f"Softmax '{softmax.node}'"),
    )


def _kept_signatures(model: savedmodel.SavedModelFile, loaded, explained: str) -> dict:
    extra = {k: loaded.signatures[k] for k in model.signature_keys() if k != explained}
    if explainable.EXPLAIN_CLASS_SIGNATURE in extra:
        raise SignatureError(
            f"the source already has a signature named {explainable.EXPLAIN_CLASS_SIGNATURE!r}, "
            "which the explainable export adds; is it already an explainable export?"
        )
    return extra
