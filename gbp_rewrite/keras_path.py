"""The Keras path: a Keras model in, a clone with custom-gradient ReLUs, an explainable SavedModel out.

    load (.keras / .h5 safely, or take the in-memory model) -> trace its serving call and find the
    ReLU-family sites exactly as the graph path does -> select them (sites.select) -> clone the
    model, giving the chosen layers a ReLU built on `tf.custom_gradient` (rules.activation) and the
    explained output's softmax/sigmoid a pass-through gradient, weights copied -> trace the explainable
    signatures over the clone (explainable.build_signatures) -> save, self-check, report.

The user's model is never modified: every layer is re-created (from its config; a Lambda from its
function), so no layer of the user's model is called on new tensors, and the clone, holding copies
of the weights, computes bit-identical predictions. A layer is one object however often it is
called, so a shared layer is rewritten at every call site.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from gbp_rewrite import explainable, export, keras_loading, keras_signature, keras_sites, rules, sites, verify
from gbp_rewrite.errors import OptionError, SelectionError, SignatureError, SourceModelError, one_line
from gbp_rewrite.inspection import ModelInfo
from gbp_rewrite.report import ConversionReport, SiteEntry
from gbp_rewrite.savedmodel import SignatureDesc

log = logging.getLogger(__name__)

Replacement = Callable[[Any], Any]  # the fresh clone of a layer -> the layer the clone uses


@dataclasses.dataclass
class Rewrite:
    """What the clone changes: the sites, the selection, and a replacement per original layer."""

    signature: keras_signature.KerasSignature
    plan: explainable.ExplainPlan
    found: list[keras_sites.KerasSite]
    selection: sites.Selection
    replacements: dict[int, Replacement]  # id(original layer) -> replacement
    tokens: dict[tuple[str, str], str]  # selected site key -> what its gradient records (rules.op_token)
    pass_through_tokens: dict[str, str]  # token -> how to name the output Softmax/Sigmoid
    score: explainable.ScorePlan
    warnings: list[str]


# ---------------------------------------------------------------------------------------------
# Public functions


def guided_model(
    model,
    *,
    layers: Sequence[str] | str | None = None,
    exclude_layers: Sequence[str] | str | None = None,
    rule: str = "guided",
    score: str = "logit",
    output: str | None = None,
):
    """A clone of the Keras `model` whose input gradients follow `rule`.

    The clone computes bit-identical predictions with copies of the weights; the ReLUs of the
    selected layers (default: all) pass gradients by the rule, and with score 'logit' the softmax
    or sigmoid that ends the explained output passes its gradient through, so
    d(output[:, c])/d(input) is the saliency of class c's logit. `model` itself is left unchanged. The clone is for use in memory
    (its activations are Python closures); to serve it, use `gbp_rewrite.convert(model, DST)`.

    Args:
      model: a built Sequential or functional keras.Model (TensorFlow backend), or the path of a
        .keras/.h5 file (loaded in Keras' safe mode).
      layers, exclude_layers: names or glob patterns, as for `convert`.
      rule: 'guided' (default), 'deconvnet' or 'vanilla'.
      score: 'logit' (default) or 'probability' (keep the softmax's/sigmoid's true gradient).
      output: the output whose softmax/sigmoid is explained, when the model has several outputs.

    Raises:
      GbpError: a one-line reason (subclassed model, unknown layer name, ...).
    """
    source = keras_loading.load(model)
    rewrite = plan_rewrite(source.model, layers=layers, exclude_layers=exclude_layers, rule=rule,
                           score=score, output=output)
    return clone_model(source.model, rewrite.replacements)


def convert(
    source,
    destination: str | os.PathLike,
    *,
    layers: Sequence[str] | str | None = None,
    exclude_layers: Sequence[str] | str | None = None,
    rule: str = "guided",
    signature: str = keras_signature.SIGNATURE_KEY,
    output: str | None = None,
    score: str = "logit",
    overwrite: bool = False,
    saliency_map: bool = False,
    version: int | str | None = None,
    safe_mode: bool = True,
) -> ConversionReport:
    """Write an explainable SavedModel of a Keras model (in memory, or a .keras/.h5 file).

    The export has the graph path's layout (`serving_default` with the model's outputs, `saliency`
    and `explained_class`; `explain_class`), report and self-check; the options mean what they
    mean for `gbp_rewrite.convert`. `safe_mode=False` allows loading files with Lambda layers,
    whose Python code runs while the file is loaded.
    """
    started = time.perf_counter()
    _check_signature_key(signature)
    destination = export.version_directory(Path(destination), version)
    loaded = keras_loading.load(source, safe_mode=safe_mode)
    export.check_destination(destination, source=loaded.path, overwrite=overwrite)
    rewrite = plan_rewrite(loaded.model, layers=layers, exclude_layers=exclude_layers, rule=rule,
                           score=score, output=output, saliency_map=saliency_map)
    clone = clone_model(loaded.model, rewrite.replacements)
    plan = rewrite.plan
    probe = verify.probe_inputs(plan.inputs)
    expected = verify.run_probe(lambda inputs: rewrite.signature.call(loaded.model, inputs), plan, probe)
    with rules.record_applications() as applied:
        signatures = explainable.build_signatures(lambda inputs: rewrite.signature.call(clone, inputs), plan)
    checks = {"rule applied": _check_applied(rewrite, applied, rule)}
    entries = [_site_entry(s, rewrite, applied) for s in rewrite.found]
    own_code = [e for e, s in zip(entries, rewrite.found) if e.status == _OWN_CODE and s.site.key in rewrite.tokens]
    if own_code:
        rewrite.warnings.append(
            f"{len(own_code)} ReLU op(s) keep their true gradient because their layer computes them in its "
            f"own code next to its activation ({', '.join(dict.fromkeys(e.path for e in own_code))}); "
            f"to rewrite every ReLU op, {keras_loading.SAVEDMODEL_ROUTE}"
        )
    with export.atomic_directory(destination, overwrite=overwrite) as tmp:
        explainable.save(tmp, owner=clone, signatures=signatures)
        checks.update(verify.self_check(tmp, plan=plan, probe=probe, expected=expected))
        report = ConversionReport.build(
            source=loaded.description, source_format=loaded.format, destination=destination, plan=plan,
            rule=rules.get_rule(rule), score=score, score_note=rewrite.score.note,
            score_plan=rewrite.score.name,
            signatures={key: plan.output_keys() for key in signatures},
            sites=entries, checks=checks,
            warnings=rewrite.warnings, started=started,
        )
        report.write(tmp)
    log.info("wrote %s: %d of %d ReLU sites rewritten with the %s rule", destination,
             len(report.rewritten), len(report.sites), rule)
    return report


class KerasModelInfo(ModelInfo):
    """`inspect` of a Keras model: its serving signature and sites, with what the Keras path can do."""

    def __init__(self, *args, kept: Mapping[tuple[str, str], str], **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = dict(kept)  # site key -> why the Keras path cannot rewrite it

    def to_dict(self) -> dict:
        data = super().to_dict()
        for entry, site in zip(data["sites"], self.sites):
            if site.key in self.kept:
                entry["keras_path"] = f"kept: {self.kept[site.key]}"
        return data

    def to_text(self) -> str:
        lines = super().to_text().splitlines()
        lines[0] = f"{self.path}: Keras model ({self.format}), as model.export would serve it"
        text = "\n".join(lines)
        if self.kept:
            text += (f"\n  {len(self.kept)} ReLU op(s) are computed where the Keras path cannot rewrite "
                     "them: " + "; ".join(sorted(set(self.kept.values())))
                     + "\n  (model.export(DIR), then convert DIR, rewrites every ReLU op)")
        return text


def inspect(source, *, signature: str | None = None, safe_mode: bool = True) -> KerasModelInfo:
    """Describe a Keras model (in memory or a .keras/.h5 file): inputs, outputs, ReLU sites by layer."""
    if signature is not None:
        _check_signature_key(signature)
    loaded = keras_loading.load(source, safe_mode=safe_mode)
    signature_desc = keras_signature.describe(loaded.model)
    found = keras_sites.find_sites(loaded.model, signature_desc)
    key = keras_signature.SIGNATURE_KEY
    return KerasModelInfo(
        loaded.description, loaded.format, [],
        {key: SignatureDesc(key, signature_desc.inputs, signature_desc.outputs)},
        key, [s.site for s in found],
        kept={s.site.key: s.reason for s in found if s.site.rewritable and not s.rewritable},
    )


# ---------------------------------------------------------------------------------------------
# Planning the rewrite


def plan_rewrite(
    model,
    *,
    layers: Sequence[str] | str | None,
    exclude_layers: Sequence[str] | str | None,
    rule: str,
    score: str,
    output: str | None,
    saliency_map: bool = False,
) -> Rewrite:
    """Find and select the sites, and decide how the clone replaces each chosen layer."""
    rules.get_rule(rule)
    explainable.check_score(score)
    signature = keras_signature.describe(model)
    plan = explainable.make_plan(keras_signature.SIGNATURE_KEY, signature.inputs, signature.outputs, output=output,
                                 saliency_map=saliency_map)
    graph = keras_sites.trace(model, signature)
    found = keras_sites.find_sites(model, signature, graph=graph)
    selection = sites.select([s.site for s in found], layers=layers, exclude_layers=exclude_layers, rule=rule)
    chosen, warnings = _rewritable_choice(found, selection, explicit=bool(sites.patterns(layers)), rule=rule)
    selection = sites.Selection(selection.sites, frozenset(s.site.key for s in chosen), selection.excluded)
    replacements, tokens = _rule_replacements(chosen, rule)
    scoring = explainable.choose_score(plan, _output_heads(graph, plan.output_key), score)
    pass_through = _pass_through_replacements(model, scoring)
    for layer, token, replacement, _ in pass_through:
        # Never a chosen ReLU layer too: a layer that ends in a softmax/sigmoid has no ReLU lowering.
        replacements[id(layer)] = replacement
    return Rewrite(signature, scoring.plan, found, selection, replacements, tokens,
                   {token: name for _, token, _, name in pass_through}, scoring, warnings)


def _rewritable_choice(found, selection: sites.Selection, *, explicit: bool, rule: str):
    """The selected sites the clone can rewrite; refuse selections it cannot honour."""
    selected = [s for s in found if s.site.key in selection.selected]
    custom = [s for s in selected if not s.rewritable]
    warnings = []
    if custom and explicit:
        first = custom[0]
        raise SelectionError(
            f"layer '{first.site.layer_path}' ({first.reason}) holds a ReLU the Keras path cannot "
            f"rewrite; select other layers, or {keras_loading.SAVEDMODEL_ROUTE}"
        )
    chosen = [s for s in selected if s.rewritable]
    if not chosen and rule == rules.VANILLA:  # the true gradient: nothing needs rewriting
        return chosen, warnings
    if not chosen:  # then every selected site is custom: sites.select selects something
        raise SelectionError(
            f"none of the {len(selected)} selected ReLU ops can be rewritten by the Keras path "
            f"({custom[0].reason}); {keras_loading.SAVEDMODEL_ROUTE}"
        )
    if custom:
        layers = ", ".join(dict.fromkeys(s.site.layer_path for s in custom))
        warnings.append(
            f"{len(custom)} ReLU op(s) keep their true gradient because the Keras path cannot rewrite "
            f"them ({layers}: {custom[0].reason}); to rewrite every ReLU op, "
            f"{keras_loading.SAVEDMODEL_ROUTE}"
        )
    _check_whole_layers(found, chosen)
    return chosen, warnings


def _check_whole_layers(found, chosen) -> None:
    """A layer is rewritten at all its call sites or none: a selection must not split a shared layer."""
    calls = collections.Counter(id(s.layer) for s in found if s.rewritable)
    picked = collections.Counter(id(s.layer) for s in chosen)
    for site in chosen:
        if picked[id(site.layer)] != calls[id(site.layer)]:
            raise SelectionError(
                f"layer '{site.site.layer_path}' is called {calls[id(site.layer)]} times and the selection "
                f"picks {picked[id(site.layer)]} of its ReLU ops; the Keras path rewrites a layer at every "
                "call site, so select it by its layer name"
            )


def _rule_replacements(chosen, rule: str) -> tuple[dict[int, Replacement], dict[tuple[str, str], str]]:
    replacements: dict[int, Replacement] = {}
    tokens: dict[tuple[str, str], str] = {}
    for site in chosen:
        # One activation function per layer object, whichever call reaches it; it records the
        # forward op too, so each op is proven on its own (a layer's own ReLU next to its
        # activation is never counted as its activation).
        token = f"keras:{site.layer.name}#{id(site.layer)}"
        tokens[site.site.key] = f"{token}@{site.site.node}"
        if id(site.layer) not in replacements:
            relu = rules.activation(rule, site.lowering.op_type, name=token)
            replacements[id(site.layer)] = _with_activation(site.layer, site.lowering.build(relu))
    return replacements, tokens


def _with_activation(layer, activation) -> Replacement:
    """Replace the layer's activation; a ReLU layer becomes an Activation layer of the same name."""
    import keras

    if isinstance(layer, keras.layers.ReLU):
        return lambda fresh: keras.layers.Activation(activation, name=fresh.name, dtype=fresh.dtype_policy)

    def replace(fresh):
        fresh.activation = activation
        return fresh

    return replace


def _output_heads(graph, output_key: str) -> sites.OutputHeads:
    """The ops that end the output in the trace of the model's call (sites.find_output_heads)."""
    from tensorflow.core.protobuf import meta_graph_pb2

    tensor = graph.structured_outputs[output_key]
    return sites.find_output_heads(meta_graph_pb2.MetaGraphDef(graph_def=graph.as_graph_def()), tensor.name)


def _pass_through_replacements(model, scoring: explainable.ScorePlan):
    """[(layer, token, replacement, name)] for each Softmax/Sigmoid op of the score plan: the layer
    that applies it, rebuilt with a pass-through gradient, as the graph path patches the op."""
    if not scoring.pass_through:
        return []
    tree = keras_sites.layer_tree(model)
    known = {name for path in tree for name in path}
    found = {}
    for head in scoring.pass_through:
        path = sites.layer_path(head.node, known, keras3=True)
        layer = tree.get(path)
        where = "/".join(path)
        if layer is None or not _ends_in(layer, head.op_type):
            raise OptionError(
                f"the output's {head.op_type} '{head.node}' is computed by code the Keras path cannot "
                f"rebuild ({'layer ' + repr(where) if layer is not None else 'outside any layer'}), so "
                "its gradient cannot pass through to the logit; use --score probability, or "
                f"{keras_loading.SAVEDMODEL_ROUTE}"
            )
        token = f"keras-{head.op_type.lower()}:{where}#{id(layer)}"
        found.setdefault(id(layer), (layer, token, _pass_through_replacement(layer, token),
                                     f"{head.op_type.lower()} of layer '{where}'"))
    return list(found.values())


def _ends_in(layer, op_type: str) -> bool:
    """True when the layer ends in one `op_type` (Softmax or Sigmoid) op that its activation (or,
    for a Softmax layer, its call) applies; a Softmax layer over several axes does not."""
    import keras

    if op_type == "Softmax" and isinstance(layer, keras.layers.Softmax):
        return not isinstance(layer.axis, (list, tuple)) or len(layer.axis) == 1
    activation = vars(layer).get("activation")
    if activation is None:
        return False
    if op_type == "Softmax":
        return keras_sites.is_softmax_function(activation)
    return op_type == "Sigmoid" and keras_sites.is_sigmoid_function(activation)


def _pass_through_replacement(layer, token: str) -> Replacement:
    """The fresh layer with its softmax/sigmoid wrapped in rules.pass_through (values unchanged)."""
    import keras

    if isinstance(layer, keras.layers.Softmax):
        def replace_call(fresh):
            softmax_call = fresh.call  # keeps Keras' mask handling; the mask is not differentiated

            def call(inputs, mask=None):
                return rules.pass_through(lambda x: softmax_call(x, mask=mask), name=token)(inputs)

            fresh.call = call
            return fresh

        return replace_call

    def replace_activation(fresh):
        fresh.activation = rules.pass_through(fresh.activation, name=token)
        return fresh

    return replace_activation


# ---------------------------------------------------------------------------------------------
# Cloning


def clone_model(model, replacements: Mapping[int, Replacement]):
    """A clone of `model` with its weights, the chosen layers replaced; `model` is not modified."""
    import keras
    from keras.src.saving import serialization_lib

    def clone_layer(layer):
        try:
            fresh = _fresh_layer(layer)
        except Exception as e:  # noqa: BLE001 - custom layers fail in many ways
            raise SourceModelError(
                f"cannot clone layer '{layer.name}' ({type(layer).__name__}) from its config: "
                f"{one_line(e)}; give it get_config/from_config, or {keras_loading.SAVEDMODEL_ROUTE}"
            ) from None
        replace = replacements.get(id(layer))
        return replace(fresh) if replace is not None else fresh

    try:
        # The clone rebuilds layers of a model already in this process (a Lambda's code has run):
        # nothing from outside is deserialised, so Keras' safe mode has nothing to guard here.
        with serialization_lib.SafeModeScope(False):
            clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except SourceModelError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SourceModelError(
            f"cannot clone model '{model.name}': {type(e).__name__}: {one_line(e)}; "
            f"{keras_loading.SAVEDMODEL_ROUTE}"
        ) from None
    _copy_weights(model, clone)
    return clone


def _fresh_layer(layer):
    """A new layer like `layer`, from its config; a Lambda keeps its live function."""
    import keras

    if type(layer) is keras.layers.Lambda:
        # From its config the function would be rebuilt from bytecode without the globals it uses.
        return keras.layers.Lambda(
            layer.function, output_shape=layer._output_shape, mask=layer.mask,
            arguments=dict(layer.arguments), name=layer.name, dtype=layer.dtype_policy,
        )
    return layer.__class__.from_config(layer.get_config())


def _copy_weights(model, clone) -> None:
    source, target = model.weights, clone.weights
    mismatch = len(source) != len(target) or any(
        tuple(a.shape) != tuple(b.shape) or a.name != b.name for a, b in zip(source, target)
    )
    if mismatch:
        raise SourceModelError(
            f"the clone of model '{model.name}' does not have the model's weights ({len(target)} "
            f"weights, the model {len(source)}); {keras_loading.SAVEDMODEL_ROUTE}"
        )
    for a, b in zip(source, target):
        b.assign(a.value)
    for layer in keras_sites.layer_tree(clone).values():
        # Preprocessing layers (Normalization, lookups) derive their state from their variables,
        # as Keras' own weight loading does after assigning them.
        finalize_state = getattr(layer, "finalize_state", None)
        if callable(finalize_state):
            finalize_state()


# ---------------------------------------------------------------------------------------------
# Conversion helpers


def _check_signature_key(signature: str) -> None:
    if signature != keras_signature.SIGNATURE_KEY:
        raise SignatureError(
            f"a Keras model has one signature, {keras_signature.SIGNATURE_KEY!r} (its call, as "
            f"model.export serves it), not {signature!r}; leave --signature out"
        )


def _check_applied(rewrite: Rewrite, applied: set[str], rule: str) -> str:
    """Prove the rule reached the gradient: a layer the clone missed would keep the plain gradient."""
    verify.check_pass_through(list(rewrite.pass_through_tokens.items()), applied)
    selected = rewrite.selection.selected_sites
    return verify.check_applied(selected, [s for s in selected if s.key in _reached_sites(rewrite, applied)], rule)


def _reached_sites(rewrite: Rewrite, applied: set[str]) -> set[tuple[str, str]]:
    """Keys of the selected sites whose rule gradient ran, op by op, for the explained score."""
    return {key for key, token in rewrite.tokens.items() if token in applied}


_OWN_CODE = "kept: computed in its layer's own code, not by the activation the Keras path rewrites"


def _site_entry(keras_site: keras_sites.KerasSite, rewrite: Rewrite, applied: set[str]) -> SiteEntry:
    """The graph path's entry, with why the Keras path keeps a ReLU a rule could rewrite.

    A selected op the clone's activation never computed (a ReLU in a layer's own `call` next to
    its activation) keeps its true gradient; one it computed but whose rule gradient never ran for
    the explained score is off the explained path.
    """
    site = keras_site.site
    status = rewrite.selection.status(site, reached=site.key in _reached_sites(rewrite, applied))
    if site.rewritable and not keras_site.rewritable:
        status = f"kept: {keras_site.reason}"
    elif site.key in rewrite.tokens and rules.forward_token(rewrite.tokens[site.key]) not in applied:
        status = _OWN_CODE
    return SiteEntry.from_site(site, status)
