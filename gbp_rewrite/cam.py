"""Grad-CAM and Guided Grad-CAM beside the guided saliency, from one forward pass.

    gradcam         [batch, H, W] float32: ReLU(sum_k w_k A_k), A the chosen layer's activation,
                    w_k the spatial mean of the TRUE gradient of the explained score at A
                    (Selvaraju et al. 2017), upsampled bilinearly to the input's H, W and divided
                    by its per-example maximum (an all-zero map stays zero)
    guided_gradcam  the guided saliency times gradcam, per channel (the saliency's shape and dtype)

How, on both paths: the forward ops are built inline in the explainable signature's graph (the
Keras path calls the clone; the graph path imports the restored function's body, see
`inline_forward`), so the chosen layer's activation is an ordinary tensor there. The saliency is
one symbolic gradient (`tf.gradients`) with the rule at every ReLU; the Grad-CAM gradient is a
second one from the score down to the activation only, built inside `rules.true_relu_gradients()`,
so the ReLUs of the head above the layer pass the true gradient. The extra work is the head's
backward pass; the forward pass is shared.

The layer (`choose_layer`): by default the last 4-D [batch, h, w, c] tensor with h, w > 1 that a
layer outputs on the path from the image input to the explained output, looking inside nested
models (ops are named by layer path, as `sites` names them); `cam_layer` names another.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Callable, Iterable, Mapping, Sequence

import tensorflow as tf

from gbp_rewrite import rules, tf_internals
from gbp_rewrite.graph import sites
from gbp_rewrite.errors import OptionError, SignatureError
from gbp_rewrite.graph.savedmodel import is_keras3_export

log = logging.getLogger(__name__)

GRADCAM = "gradcam"
GUIDED_GRADCAM = "guided_gradcam"
OUTPUT_KEYS = (GRADCAM, GUIDED_GRADCAM)
CAM_LAYER_FLAG = "--cam_layer"
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


@dataclasses.dataclass(frozen=True)
class CamLayer:
    """The chosen layer: its path, the tensor it outputs in the traced graph, and its shape."""

    layer: str
    tensor: str
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"layer '{self.layer}', output [{dims}]"


@dataclasses.dataclass
class CamOptions:
    """What the explainable signatures need for Grad-CAM; `chosen` is filled in while tracing.

    `cam_layer` is --cam_layer (None: the default choice); `known` and `keras3` are
    `sites.layer_path`'s arguments for naming the forward pass's ops by layer, after `prefix` (the
    scope the graph path imports them under) is taken off.
    """

    cam_layer: str | None = None
    known: frozenset[str] = frozenset()
    keras3: bool = True
    prefix: str = ""
    chosen: CamLayer | None = None

    def source_name(self, op_name: str) -> str:
        """The op's name in the source (without the import scope)."""
        return op_name[len(self.prefix) + 1:] if self.prefix else op_name

    def layer_path(self, op_name: str) -> tuple[str, ...]:
        return sites.layer_path(self.source_name(op_name), set(self.known), keras3=self.keras3)


def check_plan(plan) -> str:
    """The image input Grad-CAM explains; refuses signatures without exactly one 4-D float input."""
    if len(plan.saliency_outputs) != 1:
        raise SignatureError(
            f"--cam needs one image input, but signature {plan.signature_key!r} has "
            f"{len(plan.saliency_outputs)} float inputs ({', '.join(plan.saliency_outputs.values())}); "
            "convert without --cam"
        )
    (input_key,) = plan.saliency_outputs.values()
    shape = plan.inputs[input_key].shape
    if shape is None or len(shape) != 4:
        raise SignatureError(
            f"--cam needs an image input [batch, height, width, channels], but signature "
            f"{plan.signature_key!r} has input {plan.inputs[input_key].describe()}; convert without --cam"
        )
    return input_key


# ---------------------------------------------------------------------------------------------
# The layer


@dataclasses.dataclass(frozen=True)
class _Candidate:
    path: tuple[str, ...]
    tensor: tf.Tensor

    @property
    def layer(self) -> str:
        return "/".join(self.path[1:]) if len(self.path) > 1 else self.path[0]


def candidates(ops: Sequence, image: tf.Tensor, output: tf.Tensor, options: CamOptions) -> list[_Candidate]:
    """The layer outputs on the path from `image` to `output` that are [batch, h, w, c], h, w > 1,
    in graph order (`ops`: the forward pass's ops, in creation order)."""
    on_path = _ops_between(ops, image, output)
    found = []
    for op in ops:
        if op not in on_path or op.type in ("Placeholder", "Const"):
            continue
        path = options.layer_path(op.name)
        for tensor in op.outputs:
            if not _is_feature_map(tensor):
                continue
            consumers = [c for c in tensor.consumers() if c in on_path]
            if tensor is output or any(options.layer_path(c.name) != path for c in consumers):
                found.append(_Candidate(path, tensor))
    return found


def _is_feature_map(tensor: tf.Tensor) -> bool:
    shape = tensor.shape
    if not tensor.dtype.is_floating or shape.rank != 4:
        return False
    h, w = shape[1], shape[2]
    return h is not None and w is not None and h > 1 and w > 1


def _ops_between(ops: Sequence, image: tf.Tensor, output: tf.Tensor) -> set:
    """The ops of `ops` that depend on `image` and that `output` depends on."""
    members = set(ops)
    below: set = set()
    stack = [output.op]
    while stack:
        op = stack.pop()
        if op in below or op not in members:
            continue
        below.add(op)
        stack.extend(t.op for t in op.inputs)
    above: set = set()
    stack = [c for c in image.consumers()]
    while stack:
        op = stack.pop()
        if op in above or op not in below:
            continue
        above.add(op)
        for t in op.outputs:
            stack.extend(t.consumers())
    return above


def choose_layer(found: Sequence[_Candidate], cam_layer: str | None) -> _Candidate:
    """The last candidate, or the last one `cam_layer` names (a layer, a nested model, a path, a glob)."""
    if not found:
        raise SignatureError(
            "the model has no 4-D activation [batch, h, w, c] with h, w > 1 between its image input "
            f"and the explained output, so Grad-CAM has no layer to use; name one with {CAM_LAYER_FLAG} "
            "or convert without --cam"
        )
    if cam_layer is None:
        return found[-1]
    named = [c for c in found if _names(c, cam_layer)]
    if not named:
        raise OptionError(
            f"{CAM_LAYER_FLAG} {cam_layer!r} names no layer with a 4-D output [batch, h, w, c] (h, w > 1) "
            f"between the input and the explained output; such layers: {_listing(c.layer for c in found)}"
        )
    return named[-1]


def _names(candidate: _Candidate, pattern: str) -> bool:
    names = (candidate.layer, "/".join(candidate.path), *candidate.path[1:])
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _listing(names: Iterable[str], limit: int = 10) -> str:
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:limit])
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


# ---------------------------------------------------------------------------------------------
# The maps


def gradcam(activation: tf.Tensor, gradient: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """[batch, H, W] float32: ReLU(sum_k mean_hw(dS/dA_k) * A_k), bilinear to `size`, max 1 per example."""
    activation = tf.cast(activation, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradient, tf.float32), axis=[1, 2], keepdims=True)
    heat = tf.nn.relu(tf.reduce_sum(activation * weights, axis=-1, keepdims=True))
    heat = tf.image.resize(heat, size, method="bilinear")[..., 0]
    peak = tf.reduce_max(heat, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(heat, peak)  # an all-zero map stays zero, not NaN


def guided_gradcam(saliency: tf.Tensor, heat: tf.Tensor) -> tf.Tensor:
    """The saliency [batch, H, W, C] times the Grad-CAM map [batch, H, W], in the saliency's dtype."""
    return saliency * tf.cast(heat, saliency.dtype)[..., tf.newaxis]


def explain(
    forward: Callable[[dict[str, tf.Tensor]], Mapping[str, tf.Tensor]],
    plan,
    inputs: dict[str, tf.Tensor],
    class_index: tf.Tensor,
    options: CamOptions,
    *,
    seed_and_classes: Callable,
) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """(the source's outputs, the saliency, `gradcam` and `guided_gradcam`; the explained classes),
    from one forward pass. Sets `options.chosen`.

    `seed_and_classes(explained)` -> (output gradient seed, explained classes), as the plain core.
    """
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    outputs = dict(forward(inputs))
    ops = graph.get_operations()[before:]
    (saliency_key, input_key), = plan.saliency_outputs.items()
    image, explained = inputs[input_key], outputs[plan.output_key]
    found = candidates(ops, image, explained, options)
    chosen = choose_layer(found, options.cam_layer)
    _check_head(ops, found, chosen, explained, options)
    options.chosen = CamLayer(chosen.layer, chosen.tensor.name, tuple(chosen.tensor.shape.as_list()))
    seed, classes = seed_and_classes(explained)
    unconnected = tf.UnconnectedGradients.ZERO
    (saliency,) = tf.gradients(explained, [image], grad_ys=seed, unconnected_gradients=unconnected)
    with rules.true_relu_gradients():
        (cam_gradient,) = tf.gradients(explained, [chosen.tensor], grad_ys=seed, unconnected_gradients=unconnected)
    heat = gradcam(chosen.tensor, cam_gradient, tf.shape(image)[1:3])
    result = {key: outputs[key] for key in plan.outputs}
    result[saliency_key] = saliency
    result[GRADCAM] = heat
    result[GUIDED_GRADCAM] = guided_gradcam(saliency, heat)
    return result, classes


def _check_head(ops: Sequence, found: Sequence[_Candidate], chosen: _Candidate, output: tf.Tensor,
                options: CamOptions) -> None:
    """Refuse a head of nested function calls: TensorFlow builds a call's gradient once and reuses
    it, so the rule's gradient would be reused where Grad-CAM needs the true one."""
    calls = _calls_between(ops, chosen.tensor, output)
    if not calls:
        return
    # Only a layer above the calls helps; the default is the last candidate, so this needs a
    # --cam_layer that named an earlier one.
    position = next(i for i, c in enumerate(found) if c is chosen)
    later = [c.layer for c in found[position + 1:] if not _calls_between(ops, c.tensor, output)]
    fix = (f"name a later layer with {CAM_LAYER_FLAG} ({_listing(later)})" if later else
           "convert the Keras model itself or its Keras 3 export (model.export(): one traced function), "
           "or convert without --cam")
    raise SignatureError(
        f"--cam: the layers above '{chosen.layer}' are computed by nested functions "
        f"({_listing((options.source_name(c) for c in calls), 3)}; "
        "a model whose layers are separate tf.functions), whose true gradient TensorFlow cannot "
        f"build beside the guided one; {fix}"
    )


def _calls_between(ops: Sequence, activation: tf.Tensor, output: tf.Tensor) -> list[str]:
    """The names of the function-call ops between `activation` and `output`, sorted."""
    return sorted(op.name for op in _ops_between(ops, activation, output) if op.type in _CALL_OPS)


# ---------------------------------------------------------------------------------------------
# The graph path: the restored function's body, inline


_IMPORT_SCOPE = "gbp_source"


def graph_options(meta_graph, cam_layer: str | None) -> CamOptions:
    """CamOptions naming the ops `inline_forward` imports as `sites` names the source's ops."""
    return CamOptions(cam_layer, known=frozenset(sites.known_names(meta_graph)),
                      keras3=is_keras3_export(meta_graph), prefix=_IMPORT_SCOPE)


def inline_forward(function, output_keys: Sequence[str], *, variables: Sequence[tf.Variable] = (),
                   prefix: str = _IMPORT_SCOPE) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """A forward function that builds the ops of the restored signature `function` inline.

    The signature function of a TF2 SavedModel calls the model's function (which may call another):
    the calls are followed down to the function that computes every output, whose body
    (`FuncGraph.as_graph_def()`, with the patched gradient attrs) is imported into the graph being
    traced, its arguments mapped to the signature's inputs and to the captured variables. Calls of
    nested functions left in that body keep the gradient the loader gave them, so the rule also
    applies inside those functions (tf_internals.copy_call_gradient).
    """
    body, feeds, tensors = _flat_body(function, output_keys)
    graph_def = body.as_graph_def()
    calls = [op for op in body.get_operations() if op.type in _CALL_OPS]
    by_handle = {id(v.handle): v for v in variables}

    def forward(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        graph = tf.compat.v1.get_default_graph()
        input_map = {}
        for placeholder, (kind, value) in zip(body.inputs, feeds):
            if kind == "arg":
                input_map[placeholder.name] = inputs[value]
            else:
                variable = by_handle.get(id(value))
                if variable is not None:
                    graph.watch_variable(variable)  # so the export saves the variable it reads
                input_map[placeholder.name] = graph.capture(value)
        names = [tensors[key].name for key in output_keys]
        results = tf.graph_util.import_graph_def(graph_def, input_map=input_map,
                                                 return_elements=names + [op.name for op in calls], name=prefix)
        for call, imported in zip(calls, results[len(names):]):
            tf_internals.copy_call_gradient(call, imported)  # the rule inside nested functions
        return dict(zip(output_keys, results[:len(names)]))

    return forward


def _flat_body(function, output_keys: Sequence[str]):
    """(graph, [(kind, value) per graph input], {output key: tensor in graph}): the innermost
    function graph that computes every output. kind 'arg' -> value is the input key; 'capture' ->
    the captured tensor."""
    graph = function.graph
    args, kwargs = function.structured_input_signature
    if args:
        raise SignatureError("--cam needs a signature called with keyword inputs; convert without --cam")
    captured = list(function.captured_inputs)
    n_args = len(graph.inputs) - len(captured)
    keys = sorted(kwargs)
    if n_args != len(keys):
        raise SignatureError("--cam cannot map the signature's inputs onto its function; convert without --cam")
    feeds = [("arg", k) for k in keys] + [("capture", c) for c in captured]
    structure = function.structured_outputs
    flat_keys = tf.nest.flatten({key: key for key in structure}) if isinstance(structure, Mapping) else []
    if len(flat_keys) != len(function.outputs) or not set(output_keys) <= set(flat_keys):
        raise SignatureError("--cam cannot map the signature's outputs onto its function; convert without --cam")
    by_key = dict(zip(flat_keys, function.outputs))
    tensors = {key: by_key[key] for key in output_keys}
    for _ in range(100):  # calls nest a few levels deep at most
        call = _common_call(tensors.values())
        if call is None or any(t.op.type != "Placeholder" or t.graph is not graph for t in call.inputs):
            return graph, feeds, tensors
        inner = tf_internals.graph_function(graph, call.get_attr("f").name)  # the restored body
        if inner is None:
            return graph, feeds, tensors
        position = {t.name: i for i, t in enumerate(graph.inputs)}
        feeds = [feeds[position[t.name]] for t in call.inputs]
        tensors = {key: inner.graph.outputs[_through_identities(t).value_index] for key, t in tensors.items()}
        graph = inner.graph
    return graph, feeds, tensors


def _through_identities(tensor: tf.Tensor) -> tf.Tensor:
    while tensor.op.type == "Identity":
        tensor = tensor.op.inputs[0]
    return tensor


def _common_call(tensors: Iterable[tf.Tensor]):
    """The one call op every tensor comes from (through identities), or None."""
    ops = {_through_identities(t).op for t in tensors}
    if len(ops) != 1:
        return None
    (op,) = ops
    return op if op.type in _CALL_OPS else None
