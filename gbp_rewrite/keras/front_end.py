"""The Keras front end: a Keras model in, a clone with custom-gradient ReLUs for the pipeline.

    load (.keras / .h5 safely, or take the in-memory model) -> trace its serving call and find the
    ReLU-family sites exactly as the graph path does -> select them (selection.select) -> clone the
    model, giving the chosen layers a ReLU built on `tf.custom_gradient` (rules.activation) and the
    explained output's softmax/sigmoid a pass-through gradient (with the guided extension, the
    chosen layers' smooth activation wrapped in rules.smooth_activation), weights copied -> hand gbp_rewrite.pipeline
    the clone to trace the explainable signatures over, and the model to probe.

The user's model is never modified: every layer is re-created (from its config; a Lambda from its
function), so no layer of the user's model is called on new tensors, and the clone, holding copies
of the weights, computes bit-identical predictions. A layer is one object however often it is
called, so a shared layer is rewritten at every call site.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import keras
from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite import cam as cam_maps
from gbp_rewrite import rules, self_check, signatures, tf_internals, write
from gbp_rewrite.graph import sites
from gbp_rewrite.keras import loading as keras_loading, signature as keras_signature, sites as keras_sites
from gbp_rewrite.selection import Selection, patterns, select
from gbp_rewrite.errors import OptionError, SelectionError, SourceModelError, one_line
from gbp_rewrite.prepared import Options, Prepared
from gbp_rewrite.report import SiteEntry

Replacement = Callable[[Any], Any]  # the fresh clone of a layer -> the layer the clone uses


@dataclasses.dataclass
class Rewrite:
    """What the clone changes: the sites, the selection, and a replacement per original layer."""

    signature: keras_signature.KerasSignature
    plan: signatures.ExplainPlan
    found: list[keras_sites.KerasSite]
    selection: Selection
    replacements: dict[int, Replacement]  # id(original layer) -> replacement
    tokens: dict[tuple[str, str], str]  # selected site key -> what its gradient records (rules.op_token)
    pass_through_tokens: dict[str, str]  # token -> how to name the output Softmax/Sigmoid
    score: signatures.ScorePlan
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
    smooth_activations: str = rules.SMOOTH_TRUE,
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
      smooth_activations: 'true' (default) or 'guided' (the guided extension to smooth
        activations, as for `convert`: layers whose activation is swish, gelu, ... pass
        f'(x) * dy * [dy > 0]).

    Raises:
      GbpError: a one-line reason (subclassed model, unknown layer name, ...).
    """
    source = keras_loading.load(model)
    rewrite = plan_rewrite(source.model, layers=layers, exclude_layers=exclude_layers, rule=rule,
                           score=score, output=output, smooth_activations=smooth_activations)
    return clone_model(source.model, rewrite.replacements)


@contextlib.contextmanager
def prepare(source, destination: Path, options: Options, *, safe_mode: bool) -> Iterator[Prepared]:
    """The conversion of a Keras model (in memory, or a .keras/.h5 file), for gbp_rewrite.pipeline.

    The export has the graph path's layout (`serving_default` with the model's outputs, `saliency`
    and `explained_class`; `explain_class`), report and self-check; the options mean what they
    mean for `gbp_rewrite.convert`. `safe_mode=False` allows loading files with Lambda layers,
    whose Python code runs while the file is loaded. `options.cam`/`cam_layer`: Grad-CAM
    outputs, as for `gbp_rewrite.convert`.
    """
    if options.portable:
        raise OptionError(
            "--portable/--tflite/--onnx convert SavedModels; export the Keras model first "
            "(model.export(DIR)) and convert DIR"
        )
    keras_signature.check_signature_key(options.signature)
    loaded = keras_loading.load(source, safe_mode=safe_mode)
    write.check_destination(destination, source=loaded.path, overwrite=options.overwrite)
    rewrite = plan_rewrite(loaded.model, layers=options.layers, exclude_layers=options.exclude_layers,
                           rule=options.rule, score=options.score, output=options.output,
                           saliency_map=options.saliency_map, cam=options.cam,
                           smooth_activations=options.smooth_activations)
    clone = clone_model(loaded.model, rewrite.replacements)
    cam_spec = cam_options(clone, options.cam_layer) if options.cam else None
    yield Prepared(
        source=loaded.description, source_format=loaded.format, plan=rewrite.plan,
        score_note=rewrite.score.note, score_plan=rewrite.score.name,
        sites=lambda applied: _site_entries(rewrite, applied),
        owner=clone, explained=lambda inputs: rewrite.signature.call(clone, inputs),
        source_forward=lambda inputs: rewrite.signature.call(loaded.model, inputs),
        check_applied=lambda applied: _check_applied(rewrite, applied, options.rule), warnings=rewrite.warnings,
        cam=cam_spec,
        after_trace=[] if cam_spec is None else [lambda explainable: {"grad-cam layer": cam_spec.chosen.describe()}],
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
    smooth_activations: str = rules.SMOOTH_TRUE,
) -> Rewrite:
    """Find and select the sites, and decide how the clone replaces each chosen layer."""
    rules.get_rule(rule)
    rules.check_smooth_activations(smooth_activations, rule)
    signatures.check_score(score)
    signature = keras_signature.describe(model)
    plan = signatures.make_plan(keras_signature.SIGNATURE_KEY, signature.inputs, signature.outputs, output=output,
                                saliency_map=saliency_map, cam=cam)
    graph = keras_sites.trace(model, signature)
    found = keras_sites.find_sites(model, signature, graph=graph)
    heads = _output_heads(graph, plan.output_key)
    selection = select([s.site for s in found], layers=layers, exclude_layers=exclude_layers, rule=rule,
                       smooth_activations=smooth_activations, output_ends=heads.squashing_keys)
    chosen, warnings = _rewritable_choice(found, selection, explicit=bool(patterns(layers)), rule=rule)
    selection = dataclasses.replace(selection, selected=frozenset(s.site.key for s in chosen))
    replacements, tokens = _rule_replacements(chosen, rule, smooth=selection.smooth)
    scoring = signatures.choose_score(plan, heads, score)
    pass_through = _pass_through_replacements(model, scoring)
    for layer, token, replacement, _ in pass_through:
        # Never a chosen ReLU layer too: a layer that ends in a softmax/sigmoid has no ReLU lowering.
        replacements[id(layer)] = replacement
    return Rewrite(signature, scoring.plan, found, selection, replacements, tokens,
                   {token: name for _, token, _, name in pass_through}, scoring, warnings)


def _rewritable_choice(found, selection: Selection, *, explicit: bool, rule: str):
    """The selected sites the clone can rewrite; refuse selections it cannot honour."""
    selected = [s for s in found if s.site.key in selection.selected]
    custom = [s for s in selected if not s.rewritable]
    warnings = []
    smooth = [s for s in custom if s.site.key in selection.smooth]
    if smooth:  # the extension on a form the clone cannot wrap: refused, never a differing map
        first = smooth[0]
        raise SelectionError(
            f"layer '{first.site.layer_path}' holds {first.reason}, which the Keras path cannot give the "
            f"guided extension (--smooth_activations guided); {keras_loading.SAVEDMODEL_ROUTE}"
        )
    if custom and explicit:
        first = custom[0]
        raise SelectionError(
            f"layer '{first.site.layer_path}' ({first.reason}) holds a ReLU the Keras path cannot "
            f"rewrite; select other layers, or {keras_loading.SAVEDMODEL_ROUTE}"
        )
    chosen = [s for s in selected if s.rewritable]
    if not chosen and rule == rules.VANILLA:  # the true gradient: nothing needs rewriting
        return chosen, warnings
    if not chosen:  # then every selected site is custom: selection.select selects something
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


def _rule_replacements(chosen, rule: str, *, smooth=frozenset()) -> tuple[dict[int, Replacement], dict[tuple[str, str], str]]:
    replacements: dict[int, Replacement] = {}
    tokens: dict[tuple[str, str], str] = {}
    for site in chosen:
        # One activation function per layer object, whichever call reaches it; it records the
        # forward op too, so each op is proven on its own (a layer's own ReLU next to its
        # activation is never counted as its activation).
        token = f"keras:{site.layer.name}#{id(site.layer)}"
        tokens[site.site.key] = f"{token}@{site.token_node}"
        if id(site.layer) in replacements:
            continue
        if site.site.key in smooth:  # the guided extension around the layer's own activation
            replacements[id(site.layer)] = _with_smooth_activation(token)
        else:
            relu = rules.activation(rule, site.lowering.op_type, name=token)
            replacements[id(site.layer)] = _with_activation(site.layer, site.lowering.build(relu))
    return replacements, tokens


def _with_smooth_activation(token: str) -> Replacement:
    """The fresh layer with its smooth activation wrapped in the guided extension (values unchanged)."""

    def replace(fresh):
        fresh.activation = rules.smooth_activation(fresh.activation, name=token)
        return fresh

    return replace


def _with_activation(layer, activation) -> Replacement:
    """Replace the layer's activation; a ReLU layer becomes an Activation layer of the same name."""
    if isinstance(layer, keras.layers.ReLU):
        return lambda fresh: keras.layers.Activation(activation, name=fresh.name, dtype=fresh.dtype_policy)

    def replace(fresh):
        fresh.activation = activation
        return fresh

    return replace


def _output_heads(graph, output_key: str) -> sites.OutputHeads:
    """The ops that end the output in the trace of the model's call (sites.find_output_heads)."""
    tensor = graph.structured_outputs[output_key]
    return sites.find_output_heads(meta_graph_pb2.MetaGraphDef(graph_def=graph.as_graph_def()), tensor.name)


def _pass_through_replacements(model, scoring: signatures.ScorePlan):
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
        with tf_internals.keras_api().SafeModeScope(False):
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
    if type(layer) is keras.layers.Lambda:
        # From its config the function would be rebuilt from bytecode without the globals it uses.
        return keras.layers.Lambda(
            layer.function, output_shape=tf_internals.lambda_output_shape(layer), mask=layer.mask,
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


def _check_applied(rewrite: Rewrite, applied: set[str], rule: str) -> str:
    """Prove the rule reached the gradient: a layer the clone missed would keep the plain gradient."""
    self_check.check_pass_through(list(rewrite.pass_through_tokens.items()), applied)
    selected = rewrite.selection.selected_sites
    for site in selected:  # a smooth activation the clone's wrapper never computed: never silently
        token = rewrite.tokens[site.key]
        if site.key in rewrite.selection.smooth and rules.forward_token(token) not in applied:
            raise SelectionError(
                f"layer '{site.layer_path}' computes its {site.kind} ('{site.node}') in code the Keras path "
                f"cannot give the guided extension; {keras_loading.SAVEDMODEL_ROUTE}"
            )
    return self_check.check_applied(selected, [s for s in selected if s.key in _reached_sites(rewrite, applied)], rule)


def _reached_sites(rewrite: Rewrite, applied: set[str]) -> set[tuple[str, str]]:
    """Keys of the selected sites whose rule gradient ran, op by op, for the explained score."""
    return {key for key, token in rewrite.tokens.items() if token in applied}


_OWN_CODE = "kept: computed in its layer's own code, not by the activation the Keras path rewrites"


def _site_entries(rewrite: Rewrite, applied: set[str]) -> list[SiteEntry]:
    """The report's entries; warns about selected ReLUs a layer computes in its own code."""
    entries = [_site_entry(s, rewrite, applied) for s in rewrite.found]
    own_code = [e for e, s in zip(entries, rewrite.found) if e.status == _OWN_CODE and s.site.key in rewrite.tokens]
    if own_code:
        rewrite.warnings.append(
            f"{len(own_code)} ReLU op(s) keep their true gradient because their layer computes them in its "
            f"own code next to its activation ({', '.join(dict.fromkeys(e.path for e in own_code))}); "
            f"to rewrite every ReLU op, {keras_loading.SAVEDMODEL_ROUTE}"
        )
    return entries


def _site_entry(keras_site: keras_sites.KerasSite, rewrite: Rewrite, applied: set[str]) -> SiteEntry:
    """The graph path's entry, with why the Keras path keeps a ReLU a rule could rewrite.

    A selected op the clone's activation never computed (a ReLU in a layer's own `call` next to
    its activation) keeps its true gradient; one it computed but whose rule gradient never ran for
    the explained score is off the explained path.
    """
    site = keras_site.site
    status = rewrite.selection.status(site, reached=site.key in _reached_sites(rewrite, applied),
                                      passed_through=site.key in {h.key for h in rewrite.score.pass_through})
    if site.rewritable and not keras_site.rewritable:
        status = f"kept: {keras_site.reason}"
    elif site.key in rewrite.tokens and rules.forward_token(rewrite.tokens[site.key]) not in applied:
        status = _OWN_CODE
    return SiteEntry.from_site(site, status, rewrite.selection.gradient(site, status))
