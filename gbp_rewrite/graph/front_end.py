"""The graph front end: any SavedModel in, the conversion the pipeline writes.

    read saved_model.pb -> refuse file ops (security) -> find the ReLU sites the signature depends
    on -> select them -> plan the score (the output's Softmax) -> set `_gradient_op_type` on their
    NodeDefs in a private copy (BatchNorms folded in a twin of the signature) -> load the copy ->
    check it against its own declarations (validation) -> hand the pipeline the restored
    functions: the twin to trace the explainable signatures over, the original to probe.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from gbp_rewrite import rules, security, self_check, signatures, write
from gbp_rewrite.errors import OptionError, SignatureError
from gbp_rewrite.graph import savedmodel, sites, staging, validation
from gbp_rewrite.prepared import Options, PhaseTimer, Prepared
from gbp_rewrite.report import SiteEntry
from gbp_rewrite.selection import Selection, select


@contextlib.contextmanager
def prepare(
    source: Path, destination: Path, options: Options, *, allow_file_ops: bool, fold_batchnorms: bool,
) -> Iterator[Prepared]:
    """The conversion of the SavedModel `source`, valid while the patched copy exists (the block)."""
    rule, signature, score = options.rule, options.signature, options.score
    model = savedmodel.read(source)
    file_op_warnings = security.check(security.find_file_ops(model.meta_graph), allow=allow_file_ops,
                                      source=source)
    write.check_destination(destination, source=source, overwrite=options.overwrite)
    signature_desc = model.signature(signature)
    plan = signatures.make_plan(signature, signature_desc.inputs, signature_desc.outputs,
                                output=options.output, saliency_map=options.saliency_map)
    found = sites.find_sites(model.meta_graph, [d.tensor_name for d in signature_desc.outputs.values()])
    selection = select(found, layers=options.layers, exclude_layers=options.exclude_layers)
    softmax, score_note = _softmax_plan(model, plan, score)

    patches = {s.key: rules.gradient_op_type(rule, s.op_type) for s in selection.selected_sites}
    if softmax is not None:
        patches[softmax.key] = rules.SOFTMAX_PASS_THROUGH
    rules.register_graph_gradients()
    fold_signature = signature if fold_batchnorms else None
    with staging.patched_copy(model, patches, fold_signature=fold_signature) as patched:
        with PhaseTimer()("load"):
            loaded = staging.load(patched.path, tags=model.tags, source=source)
        validation.check_loaded_signatures(loaded, model.signature_keys(), source=source)
        plan = validation.reconcile_plan(plan, loaded.signatures[signature], source=source)  # no abort
        # The predictions to match are the source's own (unfolded) signature's; the explainable
        # signature is traced over the folded twin when there is one.
        source_signature = loaded.signatures[signature]
        source_fn = loaded.signatures[patched.folded_signature or signature]
        checks = {}
        if patched.folded_batchnorms:
            checks["batchnorm folding"] = (
                f"{len(patched.folded_batchnorms)} BatchNorms folded into the convolutions before them "
                "(fewer passes over the activations; predictions compared with the unfolded source below)"
            )
        yield Prepared(
            source=str(source), source_format=model.format, plan=plan, score_note=score_note,
            sites=lambda applied: [SiteEntry.from_site(s, selection.status(s)) for s in found], owner=loaded,
            explained=lambda inputs: source_fn(**inputs),
            source_forward=lambda inputs: source_signature(**inputs),
            check_applied=lambda applied: _check_applied(selection, softmax, applied, rule),
            kept_signatures=_kept_signatures(model, loaded, signature), checks=checks,
            warnings=file_op_warnings, probe_while_tracing=True,
            tensorflow_errors=lambda doing: validation.tensorflow_errors(doing, source=source),
        )


def _softmax_plan(model: savedmodel.SavedModelFile, plan: signatures.ExplainPlan, score: str):
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


def _check_applied(selection: Selection, softmax: sites.Site | None, applied: set[str], rule: str) -> str:
    """Prove the rule reached the graph: an ignored attr would leave the plain gradient."""
    return self_check.check_applied(
        selection.selected_sites, _site_key, applied, rule,
        softmax=None if softmax is None else (_site_key(softmax), f"Softmax '{softmax.node}'"),
    )


def _kept_signatures(model: savedmodel.SavedModelFile, loaded, explained: str) -> dict:
    extra = {k: loaded.signatures[k] for k in model.signature_keys() if k != explained}
    if signatures.EXPLAIN_CLASS_SIGNATURE in extra:
        raise SignatureError(
            f"the source already has a signature named {signatures.EXPLAIN_CLASS_SIGNATURE!r}, "
            "which the explainable export adds; is it already an explainable export?"
        )
    return extra
