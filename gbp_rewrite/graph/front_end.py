"""The graph front end: any SavedModel in, the conversion the pipeline writes.

    read saved_model.pb -> refuse file ops (security) -> find the ReLU sites the signature depends
    on -> select them -> plan the score (the output's Softmax) -> set `_gradient_op_type` on their
    NodeDefs in a private copy (BatchNorms folded in a twin of the signature) -> load the copy ->
    check it against its own declarations (validation) -> hand the pipeline the restored
    functions: the twin to trace the explainable signatures over, the original to probe.

With `portable` (gbp_rewrite.portable) every covered op of the copy gets its forward-ops-only
gradient, the traced signature is checked for portable ops, and the .tflite/.onnx files asked for
are written beside the export, renamed into place only when the whole conversion succeeded.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from gbp_rewrite import cam as cam_maps
from gbp_rewrite import rules, security, self_check, signatures, write
from gbp_rewrite.conventions import REPORT_PATH
from gbp_rewrite.errors import SignatureError, SourceModelError
from gbp_rewrite.graph import savedmodel, sites, staging, validation
from gbp_rewrite.portable import export as portable_export
from gbp_rewrite.portable import gradients as portable_gradients
from gbp_rewrite.prepared import Options, PhaseTimer, Prepared
from gbp_rewrite.report import SiteEntry
from gbp_rewrite.selection import Selection, select
from gbp_rewrite.serving import serving_signatures


@contextlib.contextmanager
def prepare(
    source: Path, destination: Path, options: Options, *, allow_file_ops: bool, fold_batchnorms: bool,
) -> Iterator[Prepared]:
    """The conversion of the SavedModel `source`, valid while the patched copy exists (the block)."""
    rule, signature, score = options.rule, options.signature, options.score
    model = savedmodel.read(source)
    _refuse_explainable_export(source)
    file_op_warnings = security.check(security.find_file_ops(model.meta_graph), allow=allow_file_ops,
                                      source=source)
    write.check_destination(destination, source=source, overwrite=options.overwrite)
    signature_desc = model.signature(signature)
    plan = signatures.make_plan(signature, signature_desc.inputs, signature_desc.outputs,
                                output=options.output, saliency_map=options.saliency_map, cam=options.cam)
    serving_signatures.make_serving_plan(plan, options.serving)  # refuse early, before anything is loaded
    found = sites.find_sites(model.meta_graph, [d.tensor_name for d in signature_desc.outputs.values()])
    heads = sites.find_output_heads(model.meta_graph, plan.explained.tensor_name)
    selection = select(found, layers=options.layers, exclude_layers=options.exclude_layers, rule=rule,
                       smooth_activations=options.smooth_activations, output_ends=heads.squashing_keys)
    scoring = signatures.choose_score(plan, heads, score)
    plan = scoring.plan
    on_path = sites.gradient_path(model.meta_graph, plan.explained.tensor_name)

    relu_gradient = portable_gradients.relu_gradient_op_type if options.portable else rules.gradient_op_type
    patches = {s.key: relu_gradient(rule, s.op_type) for s in selection.selected_sites if s.key not in selection.smooth}
    patches.update(_smooth_patches(model, selection))
    for head in scoring.pass_through:  # Softmax and Sigmoid alike: dx = dy
        patches[head.key] = rules.SOFTMAX_PASS_THROUGH
    rules.register_graph_gradients()
    if options.portable:
        portable_gradients.register()
    fold_signature = signature if fold_batchnorms else None
    mark = portable_export.mark_portable_gradients if options.portable else None
    with portable_export.staged_files(tflite=options.tflite, onnx=options.onnx,
                                      overwrite=options.overwrite) as staged, \
            staging.patched_copy(model, patches, fold_signature=fold_signature, also=mark,
                                 # portable: a BatchNorm left unfolded would make the converters store
                                 # the forward kernel scaled and the backward's unscaled (two copies)
                                 fold_every=options.portable) as patched:
        with PhaseTimer()("load"):
            loaded = staging.load(patched.path, tags=model.tags, source=source)
        validation.check_loaded_signatures(loaded, model.signature_keys(), source=source)
        plan = validation.reconcile_plan(plan, loaded.signatures[signature], source=source)  # no abort
        # The predictions to match are the source's own (unfolded) signature's; the explainable
        # signature is traced over the folded twin when there is one.
        source_signature = loaded.signatures[signature]
        source_fn = loaded.signatures[patched.folded_signature or signature]
        explained, cam_options = (lambda inputs: source_fn(**inputs)), None
        if options.cam:  # the forward ops inline, so the chosen layer's activation is at hand
            cam_options = cam_maps.graph_options(model.meta_graph, options.cam_layer)
            explained = cam_maps.inline_forward(source_fn, list(plan.outputs),
                                                variables=signatures.variables_of(loaded))
        checks = {}
        if patched.folded_batchnorms:
            checks["batchnorm folding"] = (
                f"{len(patched.folded_batchnorms)} BatchNorms folded into the convolutions before them "
                "(fewer passes over the activations; predictions compared with the unfolded source below)"
            )
        yield Prepared(
            source=str(source), source_format=model.format, plan=plan, score_note=scoring.note,
            score_plan=scoring.name, owner=loaded,
            sites=lambda applied: _site_entries(found, selection, _reached_sites(selection, applied, on_path),
                                                passed_through={s.key for s in scoring.pass_through}),
            explained=explained, cam=cam_options,
            source_forward=lambda inputs: source_signature(**inputs),
            check_applied=lambda applied: _check_applied(
                selection, scoring.pass_through, applied, _reached_sites(selection, applied, on_path), rule),
            kept_signatures=_kept_signatures(model, loaded, signature), checks=checks,
            warnings=file_op_warnings, probe_while_tracing=True,
            tensorflow_errors=lambda doing: validation.tensorflow_errors(doing, source=source),
            after_trace=([_portable_ops_check(model, signature)] if options.portable else [])
                        + _cam_layer(cam_options),
            write_beside=_portable_files_writer(staged, plan, signature) if staged.temporary else None,
        )


def _refuse_explainable_export(source: Path) -> None:
    """An export `convert` wrote explains already: converting it again would explain the saliency
    signature's gradient, not the model. Its report names the original to convert instead."""
    report = source / REPORT_PATH
    if not report.is_file():
        return
    try:
        original = json.loads(report.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        original = None
    hint = f" ('{original}', by its report)" if original else ""
    raise SourceModelError(
        f"'{source}' is already an explainable export (written by gbp-rewrite convert: it has "
        f"{REPORT_PATH}); convert the original model instead{hint}, or use this one as it is "
        "(explain, verify, serve)"
    )


def _portable_ops_check(model: savedmodel.SavedModelFile, signature: str):
    """The check that the traced explained signature uses portable ops only (naming the layer of
    the first that is not)."""
    known, keras3 = sites.known_names(model.meta_graph), sites.is_keras3_trace(model.meta_graph)

    def layer_of(node: str) -> str:
        return "/".join(sites.layer_path(node, known, keras3=keras3))

    return lambda explainable: {"portable ops": portable_export.check_ops(explainable[signature], layer_of=layer_of)}


def _portable_files_writer(staged: portable_export.StagedFiles, plan: signatures.ExplainPlan, signature: str):
    """Writes the .tflite/.onnx files from the saved export and checks them against the traced
    explainable signature itself on the probe batch."""

    def write_files(export_dir: Path, explainable: dict, probe) -> dict[str, str]:
        with PhaseTimer()("portable files"):
            outputs = explainable[signature](**self_check.to_tensors(probe, plan.inputs))
            expected = {key: value.numpy() for key, value in outputs.items()}
            return portable_export.write_and_check(export_dir, staged, signature=signature, probe=probe,
                                                   expected=expected)

    return write_files


def _smooth_patches(model: savedmodel.SavedModelFile, selection: Selection) -> dict[tuple[str, str], str]:
    """The guided extension's attrs: on the output op of each selected smooth activation, and on
    the IdentityN of a saved custom gradient over it (else the saved gradient would skip the ops)."""
    chosen = [s for s in selection.selected_sites if s.key in selection.smooth]
    types = sites.op_types(model.meta_graph, [s.output_key for s in chosen])
    patches = {s.output_key: rules.smooth_gradient_op_type(types[s.output_key]) for s in chosen}
    patches.update({(s.function, s.custom_gradient): rules.OPS_BY_OP_GRADIENT for s in chosen if s.custom_gradient})
    return patches


def _site_key(site: sites.Site) -> str:
    """The key the site's gradient is recorded under (savedmodel sets it as rules.SITE_ATTR): its
    own op's, or for a smooth activation with the guided extension, its output op's."""
    return rules.site_key(*site.output_key) if site.smooth else rules.site_key(site.function, site.node)


def _reached_sites(selection: Selection, applied: set[str], on_path: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Keys of the selected sites the explained score's gradient really runs through: the rule's
    gradient was built for the op (the recorder), and the op is on the explained output's gradient
    path (a restored function's gradient is built for all its outputs at once, other heads too)."""
    return {s.key for s in selection.selected_sites
            if _site_key(s) in applied and (s.output_key if s.key in selection.smooth else s.key) in on_path}


def _cam_layer(cam_options) -> list:
    """The report's line naming the layer Grad-CAM chose (known once the signatures are traced)."""
    if cam_options is None:
        return []
    return [lambda explainable: {"grad-cam layer": cam_options.chosen.describe()}]


def _site_entries(found, selection: Selection, reached: set[tuple[str, str]], *,
                  passed_through: set[tuple[str, str]]) -> list[SiteEntry]:
    entries = []
    for s in found:
        status = selection.status(s, reached=s.key in reached, passed_through=s.key in passed_through)
        entries.append(SiteEntry.from_site(s, status, selection.gradient(s, status)))
    return entries


def _check_applied(selection: Selection, pass_through, applied: set[str],
                   reached: set[tuple[str, str]], rule: str) -> str:
    """Prove the rule reached the graph: an ignored attr would leave the plain gradient."""
    self_check.check_pass_through([(_site_key(s), f"{s.op_type} '{s.node}'") for s in pass_through], applied)
    return self_check.check_applied(selection.selected_sites,
                                    [s for s in selection.selected_sites if s.key in reached], rule)


def _kept_signatures(model: savedmodel.SavedModelFile, loaded, explained: str) -> dict:
    extra = {k: loaded.signatures[k] for k in model.signature_keys() if k != explained}
    if signatures.EXPLAIN_CLASS_SIGNATURE in extra:
        raise SignatureError(
            f"the source already has a signature named {signatures.EXPLAIN_CLASS_SIGNATURE!r}, "
            "which the explainable export adds; is it already an explainable export?"
        )
    return extra
