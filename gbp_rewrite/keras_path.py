"""The Keras path: a Keras model in, a clone with custom-gradient ReLUs, an explainable SavedModel out.

    load (.keras / .h5 safely, or take the in-memory model) -> trace its serving call and find the
    ReLU-family sites exactly as the graph path does -> select them (sites.select) -> clone the
    model, giving the chosen layers a ReLU built on `tf.custom_gradient` (rules.activation) and the
    explained output's softmax a pass-through gradient, weights copied -> trace the explainable
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

from gbp_rewrite import cam as cam_maps
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
    tokens: dict[tuple[str, str], str]  # selected site key -> name its gradient records
    softmax_token: str | None
    score_note: str
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
    that ends the explained output passes its gradient through, so d(output[:, c])/d(input) is the
    saliency of class c's logit. `model` itself is left unchanged. The clone is for use in memory
    (its activations are Python closures); to serve it, use `gbp_rewrite.convert(model, DST)`.

    Args:
      model: a built Sequential or functional keras.Model (TensorFlow backend), or the path of a
        .keras/.h5 file (loaded in Keras' safe mode).
      layers, exclude_layers: names or glob patterns, as for `convert`.
      rule: 'guided' (default), 'deconvnet' or 'vanilla'.
      score: 'logit' (default) or 'probability' (keep the softmax's true gradient).
      output: the output whose softmax is explained, when the model has several outputs.

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
    cam: bool = False,
    cam_layer: str | None = None,
) -> ConversionReport:
    """Write an explainable SavedModel of a Keras model (in memory, or a .keras/.h5 file).

    The export has the graph path's layout (`serving_default` with the model's outputs, `saliency`
    and `explained_class`; `explain_class`), report and self-check; the options mean what they
    mean for `gbp_rewrite.convert`. `safe_mode=False` allows loading files with Lambda layers,
    whose Python code runs while the file is loaded. `cam`/`cam_layer`: Grad-CAM outputs, as
    for `gbp_rewrite.convert`.
    """
    started = time.perf_counter()
    _check_signature_key(signature)
    destination = export.version_directory(Path(destination), version)
    loaded = keras_loading.load(source, safe_mode=safe_mode)
    export.check_destination(destination, source=loaded.path, overwrite=overwrite)
    cam = cam or cam_layer is not None
    rewrite = plan_rewrite(loaded.model, layers=layers, exclude_layers=exclude_layers, rule=rule,
                           score=score, output=output, saliency_map=saliency_map, cam=cam)
    clone = clone_model(loaded.model, rewrite.replacements)
    plan = rewrite.plan
    probe = verify.probe_inputs(plan.inputs)
    expected = verify.run_probe(lambda inputs: rewrite.signature.call(loaded.model, inputs), plan, probe)
    cam_spec = cam_options(clone, cam_layer) if cam else None
    with rules.record_applications() as applied:
        signatures = explainable.build_signatures(lambda inputs: rewrite.signature.call(clone, inputs), plan,
                                                  cam=cam_spec)
    checks = {"rule applied": _check_applied(rewrite, applied, rule)}
    if cam_spec is not None:
        checks["grad-cam layer"] = cam_spec.chosen.describe()
    with export.atomic_directory(destination, overwrite=overwrite) as tmp:
        explainable.save(tmp, owner=clone, signatures=signatures)
        checks.update(verify.self_check(tmp, plan=plan, probe=probe, expected=expected))
        report = ConversionReport.build(
            source=loaded.description, source_format=loaded.format, destination=destination, plan=plan,
            rule=rules.get_rule(rule), score=score, score_note=rewrite.score_note,
            signatures={key: plan.output_keys() for key in signatures},
            sites=[_site_entry(s, rewrite.selection) for s in rewrite.found], checks=checks,
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
    cam: bool = False,
) -> Rewrite:
    """Find and select the sites, and decide how the clone replaces each chosen layer."""
    rules.get_rule(rule)
    explainable.check_score(score)
    signature = keras_signature.describe(model)
    plan = explainable.make_plan(keras_signature.SIGNATURE_KEY, signature.inputs, signature.outputs, output=output,
                                 saliency_map=saliency_map, cam=cam)
    found = keras_sites.find_sites(model, signature)
    selection = sites.select([s.site for s in found], layers=layers, exclude_layers=exclude_layers)
    chosen, warnings = _rewritable_choice(found, selection, explicit=bool(sites.patterns(layers)))
    selection = sites.Selection(selection.sites, frozenset(s.site.key for s in chosen), selection.excluded)
    replacements, tokens = _rule_replacements(chosen, rule)
    softmax, score_note = _softmax_replacement(signature, plan, score)
    softmax_token = None
    if softmax is not None:
        # Never a chosen ReLU layer too: a layer that ends in a softmax has no ReLU lowering.
        layer, softmax_token, replacement = softmax
        replacements[id(layer)] = replacement
    return Rewrite(signature, plan, found, selection, replacements, tokens, softmax_token, score_note, warnings)


def _rewritable_choice(found, selection: sites.Selection, *, explicit: bool):
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
    if not chosen:  # then every selected site is custom: sites.select never selects nothing
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
        # One token per layer object: its activation is one function, whichever call reaches it.
        token = f"keras:{site.layer.name}#{id(site.layer)}"
        tokens[site.site.key] = token
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


def _softmax_replacement(signature: keras_signature.KerasSignature, plan: explainable.ExplainPlan, score: str):
    """((layer, token, replacement) or None, note): the output softmax's pass-through, as the graph path."""
    layer, path = _output_producer(signature, plan.output_key)
    where = "/".join(path)
    ends_in_softmax = _ends_in_softmax(layer)
    if score == "logit":
        if not ends_in_softmax:
            return None, f"the output ends in layer '{where}' ({_describe_layer(layer)}), not Softmax: its value is the score"
        token = f"keras-softmax:{where}#{id(layer)}"
        return (layer, token, _pass_through_replacement(layer, token)), (
            f"pre-softmax logit: the softmax of layer '{where}' passes the gradient through")
    if not ends_in_softmax:
        raise OptionError(
            f"--score probability needs an output that ends in Softmax, but {plan.output_key!r} ends "
            f"in layer '{where}' ({_describe_layer(layer)}); its value already is the score, use --score logit"
        )
    return None, "softmax probability with the true softmax gradient"


def _ends_in_softmax(layer) -> bool:
    """True when the layer ends in one Softmax op (a Softmax layer over several axes does not)."""
    import keras

    if isinstance(layer, keras.layers.Softmax):
        return not isinstance(layer.axis, (list, tuple)) or len(layer.axis) == 1
    activation = vars(layer).get("activation")
    return activation is not None and keras_sites.is_softmax_function(activation)


def _pass_through_replacement(layer, token: str) -> Replacement:
    """The fresh layer with its softmax wrapped in rules.pass_through (values unchanged)."""
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


def _describe_layer(layer) -> str:
    activation = vars(layer).get("activation")
    name = getattr(activation, "__name__", None) if activation is not None else None
    return f"{type(layer).__name__}, activation {name}" if name else type(layer).__name__


def _output_producer(signature: keras_signature.KerasSignature, output_key: str):
    """The layer that computes the output, looking into nested models, and its path."""
    import keras
    from keras.src.models.functional import Functional

    tensor = dict(keras_signature.keyed_outputs(signature.output_structure))[output_key]
    path: list[str] = [signature.model_name]
    for _ in range(10_000):  # a bound against malformed, cyclic graphs
        history = tensor._keras_history
        layer = history.operation
        path.append(layer.name)
        if isinstance(layer, keras.Sequential):
            tensor = layer.outputs[history.tensor_index]
        elif isinstance(layer, Functional):
            tensor = keras.tree.flatten(layer.output)[history.tensor_index]
        else:
            return layer, tuple(path)
    raise SourceModelError(f"cannot find the layer that computes output {output_key!r}")


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


def cam_options(clone, cam_layer: str | None) -> cam_maps.CamOptions:
    """Grad-CAM's layer naming for the clone's ops, traced inline (the layer paths sites uses)."""
    known = frozenset(name for path in keras_sites.layer_tree(clone) for name in path)
    return cam_maps.CamOptions(cam_layer, known=known, keras3=True)


def _check_signature_key(signature: str) -> None:
    if signature != keras_signature.SIGNATURE_KEY:
        raise SignatureError(
            f"a Keras model has one signature, {keras_signature.SIGNATURE_KEY!r} (its call, as "
            f"model.export serves it), not {signature!r}; leave --signature out"
        )


def _check_applied(rewrite: Rewrite, applied: set[str], rule: str) -> str:
    """Prove the rule reached the gradient: a layer the clone missed would keep the plain gradient."""
    softmax = None if rewrite.softmax_token is None else (rewrite.softmax_token, "softmax")
    return verify.check_applied(rewrite.selection.selected_sites, lambda site: rewrite.tokens[site.key],
                                applied, rule, softmax=softmax)


def _site_entry(keras_site: keras_sites.KerasSite, selection: sites.Selection) -> SiteEntry:
    """The graph path's entry, with why the Keras path keeps a ReLU a rule could rewrite."""
    site = keras_site.site
    status = selection.status(site)
    if site.rewritable and not keras_site.rewritable:
        status = f"kept: {keras_site.reason}"
    return SiteEntry.from_site(site, status)
