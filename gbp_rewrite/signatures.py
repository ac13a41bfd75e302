"""The exported signatures: the original outputs, the saliency and the explained class together.

Both paths (the patched SavedModel and the Keras custom-gradient clone) hand this module a
`forward` function (a dict of input tensors -> a dict of output tensors, with the rule's gradients
inside) and the variables' owner; this module writes the explainable SavedModel:

    <signature key>   inputs as the source            outputs: the source's outputs,
                                                                saliency (or saliency_<input> each),
                                                                explained_class [batch] int64
    explain_class     inputs as the source + class_index [batch] int64        same outputs

With `saliency_map=True` both signatures also return `saliency_map` ([batch, H, W] float32: the
largest |saliency| over the channels, divided by its per-example maximum), a ready heat map for
clients; only for image inputs ([batch, H, W, C]).

One forward pass feeds both the predictions and the gradient, and the score's gradient is seeded
with a one-hot vector of the explained class, so there is no gather/scatter plumbing in the graph.
A binary sigmoid output (one unit p) has classes 1 and 0: the seed is +1 or -1 (score z or -z, p
or 1 - p). What the score is (logit or value) is decided by `choose_score` from the ops that end
the output (sites.find_output_heads); see the README's "What is explained".
"""

from __future__ import annotations

import dataclasses
import keyword
import logging
import shutil
from pathlib import Path
from typing import Callable, Mapping

import tensorflow as tf

from gbp_rewrite import tf_internals
from gbp_rewrite.conventions import CLASS_INDEX, EXPLAIN_CLASS_SIGNATURE, EXPLAINED_CLASS, some_names
from gbp_rewrite import cam as cam_maps
from gbp_rewrite.errors import OptionError, SignatureError
from gbp_rewrite.graph.lean import finish_export
from gbp_rewrite.graph.savedmodel import TensorDesc

log = logging.getLogger(__name__)

SALIENCY = "saliency"
SALIENCY_MAP = "saliency_map"
SCORES = ("logit", "probability")

Forward = Callable[[dict[str, tf.Tensor]], Mapping[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class ExplainPlan:
    """What to explain: the signature's inputs, which get a saliency, and the explained output."""

    signature_key: str
    inputs: dict[str, TensorDesc]
    outputs: dict[str, TensorDesc]
    saliency_outputs: dict[str, str]  # saliency output key -> input key
    output_key: str
    saliency_maps: dict[str, str] = dataclasses.field(default_factory=dict)  # map key -> saliency key
    # A binary sigmoid output ([batch] or [batch, 1] probability p of class 1): class 1 is explained
    # where p > 0.5, else class 0, whose score is the negated one (-z, or 1 - p).
    binary: bool = False
    cam_outputs: tuple[str, ...] = ()  # gradcam, guided_gradcam with --cam (gbp_rewrite.cam)

    @property
    def explained(self) -> TensorDesc:
        return self.outputs[self.output_key]

    @property
    def num_classes(self) -> int:
        """The number of output units of the explained output."""
        shape = self.explained.shape
        return 1 if len(shape) == 1 else shape[-1]

    @property
    def class_count(self) -> int:
        """The number of classes `explain_class` accepts: 2 for a binary sigmoid output."""
        return 2 if self.binary else self.num_classes

    def output_keys(self) -> list[str]:
        return (list(self.outputs) + list(self.saliency_outputs) + list(self.saliency_maps)
                + list(self.cam_outputs) + [EXPLAINED_CLASS])


def check_score(score: str) -> None:
    """Raise an OptionError unless `score` is one of SCORES."""
    if score not in SCORES:
        raise OptionError(f"unknown score {score!r}; valid scores: {', '.join(SCORES)}")


@dataclasses.dataclass(frozen=True)
class ScorePlan:
    """What the score is: the ops to give a pass-through gradient, the plan, and the report's words."""

    plan: ExplainPlan  # with `binary` set for a binary sigmoid output
    pass_through: tuple  # the Softmax/Sigmoid sites (sites.Site) whose gradient passes straight through
    name: str  # e.g. "softmax logit", "binary sigmoid probability", "output value"
    note: str


def choose_score(plan: ExplainPlan, heads, score: str) -> ScorePlan:
    """Decide what is explained, from how the output ends (`heads`: a sites.OutputHeads).

    score 'logit': every Softmax/Sigmoid that ends the output (behind shape-only ops and
    concatenations) passes the gradient through; an output that ends in other ops is a logit
    already. Refused when a Softmax/Sigmoid hides behind arithmetic at the output's end.
    score 'probability': the output's value with its true gradient (1 - p for a binary sigmoid's
    class 0); refused when the output ends in no Softmax/Sigmoid (its value is the logit).
    """
    check_score(score)
    squashing, hidden = heads.squashing, heads.hidden
    kinds = {s.op_type for s in squashing}
    binary = kinds == {"Sigmoid"} and not heads.plain and plan.num_classes == 1
    plan = dataclasses.replace(plan, binary=binary)
    head = "binary sigmoid" if binary else "multi-label sigmoid" if kinds == {"Sigmoid"} else "softmax"
    ops = ", ".join(f"{s.op_type} '{s.node}'" for s in squashing[:3]) + (
        f" and {len(squashing) - 3} more" if len(squashing) > 3 else "")
    passes = "passes" if len(squashing) == 1 else "pass"
    ends = ", ".join(f"{s.op_type} '{s.node}'" for s in heads.plain[:3]) or "an op that could not be traced"
    if score == "logit":
        if hidden is not None:
            raise OptionError(
                f"output {plan.output_key!r} has no logit to explain: its {hidden.op_type} "
                f"'{hidden.node}' is followed by arithmetic ({ends}), so its gradient cannot pass "
                "through; explain the output's value with --score probability"
            )
        if not squashing:
            return ScorePlan(plan, (), "output value (a logit)",
                             f"the output ends in {ends}, not Softmax or Sigmoid: its value is the score")
        if binary:
            note = f"logit z for class 1 (where p > 0.5), -z for class 0; {ops} {passes} the gradient through"
        elif head == "softmax":
            note = f"pre-softmax logit: {ops} {passes} the gradient through"
        else:
            note = f"pre-sigmoid logit of the top class; {ops} {passes} the gradient through"
        return ScorePlan(plan, tuple(squashing), f"{head} logit", note)
    if hidden is not None:
        return ScorePlan(plan, (), "output value",
                         f"the output's value with its true gradient ({hidden.op_type} '{hidden.node}' "
                         f"is followed by {ends})")
    if not squashing:
        raise OptionError(
            f"--score probability needs an output that ends in Softmax or Sigmoid, but "
            f"{plan.output_key!r} ends in {ends}; its value already is the score, use --score logit"
        )
    function = "softmax" if head == "softmax" else "sigmoid"
    note = f"{function} probability with the true {function} gradient"
    if binary:
        note = "sigmoid probability p for class 1, 1 - p for class 0, with the true sigmoid gradient"
    return ScorePlan(plan, (), f"{head} probability", note)


def make_plan(
    signature_key: str,
    inputs: Mapping[str, TensorDesc],
    outputs: Mapping[str, TensorDesc],
    *,
    output: str | None = None,
    saliency_map: bool = False,
    cam: bool = False,
) -> ExplainPlan:
    """Check that the signature can be explained and decide the layout of the exported one.

    `saliency_map` adds a [batch, H, W] heat map output per saliency (image inputs only); `cam`
    adds `gradcam` and `guided_gradcam` (gbp_rewrite.cam; one image input only).
    """
    _check_input_keys(signature_key, inputs)
    float_inputs = [k for k, d in inputs.items() if d.dtype is not None and d.dtype.is_floating]
    if not float_inputs:
        described = "; ".join(d.describe() for d in inputs.values()) or "none"
        raise SignatureError(
            f"signature {signature_key!r} has no floating-point input (inputs: {described}); the "
            "saliency is a gradient with respect to an input, so it needs a float input. For token "
            "or categorical inputs, export a signature that takes the embeddings (a float tensor) "
            "as input and convert that signature with --signature"
        )
    output_key = _choose_output(signature_key, outputs, output)
    if len(float_inputs) == 1:
        saliency = {SALIENCY: float_inputs[0]}
    else:
        saliency = {f"{SALIENCY}_{k}": k for k in float_inputs}
    maps = _saliency_maps(signature_key, inputs, saliency) if saliency_map else {}
    cam_outputs = cam_maps.OUTPUT_KEYS if cam else ()
    clashes = sorted((set(saliency) | set(maps) | set(cam_outputs) | {EXPLAINED_CLASS}) & set(outputs))
    if clashes or CLASS_INDEX in inputs:
        taken = ", ".join(clashes + ([CLASS_INDEX] if CLASS_INDEX in inputs else []))
        raise SignatureError(
            f"signature {signature_key!r} already uses the name(s) {taken}, which the explainable "
            "signature adds; rename them in the source model"
        )
    plan = ExplainPlan(signature_key, dict(inputs), dict(outputs), saliency, output_key, maps,
                       cam_outputs=cam_outputs)
    if cam:
        cam_maps.check_plan(plan)
    return plan


def _saliency_maps(signature_key: str, inputs: Mapping[str, TensorDesc], saliency: dict[str, str]) -> dict[str, str]:
    """saliency_map output key -> saliency output key; refuses inputs that are not images."""
    for input_key in saliency.values():
        shape = inputs[input_key].shape
        if shape is None or len(shape) != 4:
            raise SignatureError(
                f"--saliency_map needs image inputs [batch, height, width, channels], but signature "
                f"{signature_key!r} has input {inputs[input_key].describe()}; convert without "
                "--saliency_map and use the `saliency` output"
            )
    return {SALIENCY_MAP + key[len(SALIENCY):]: key for key in saliency}


def _check_input_keys(signature_key: str, inputs: Mapping[str, TensorDesc]) -> None:
    for key in inputs:
        if not key.isidentifier() or keyword.iskeyword(key):
            raise SignatureError(
                f"signature {signature_key!r} has an input key {key!r} that is not a Python "
                "identifier; gbp_rewrite can only rebuild signatures whose input keys are"
            )


def _choose_output(signature_key: str, outputs: Mapping[str, TensorDesc], output: str | None) -> str:
    keys = list(outputs)
    if output is None:
        if len(keys) != 1:
            raise SignatureError(
                f"signature {signature_key!r} has {len(keys)} outputs ({some_names(keys) or 'none'}); "
                "choose the one to explain with --output"
            )
        output = keys[0]
    elif output not in outputs:
        raise SignatureError(
            f"signature {signature_key!r} has no output {output!r}; its outputs: {some_names(keys)}"
        )
    desc = outputs[output]
    if desc.dtype is None or not desc.dtype.is_floating:
        raise SignatureError(
            f"output {output!r} is {getattr(desc.dtype, 'name', 'of unknown type')}, not a float "
            "score; choose a float output (class scores or probabilities) with --output"
        )
    if desc.shape is None or len(desc.shape) not in (1, 2) or (len(desc.shape) == 2 and desc.shape[1] is None):
        fix = ("choose another with --output" if len(keys) > 1 else
               "export the model with an output of class scores, e.g. end it in a Reshape to [batch, classes]")
        raise SignatureError(
            f"output {output!r} has shape {desc.describe().split(' ', 2)[-1]}; the explained output "
            f"must be [batch] or [batch, classes] with a known number of classes ({fix})"
        )
    return output


# ---------------------------------------------------------------------------------------------
# Graph construction


def _explain(forward: Forward, plan: ExplainPlan, inputs: dict[str, tf.Tensor], class_index: tf.Tensor):
    watched = [inputs[key] for key in plan.saliency_outputs.values()]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(watched)
        outputs = dict(forward(inputs))
    explained = outputs[plan.output_key]
    seed, classes = _seed_and_classes(explained, plan, class_index)
    gradients = tape.gradient(
        explained, watched, output_gradients=seed,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    result = {key: outputs[key] for key in plan.outputs}
    result.update(zip(plan.saliency_outputs, gradients))
    for map_key, saliency_key in plan.saliency_maps.items():
        result[map_key] = _saliency_map(result[saliency_key])
    result[EXPLAINED_CLASS] = classes
    return result


def _seed_and_classes(explained: tf.Tensor, plan: ExplainPlan, class_index: tf.Tensor):
    """The output gradient that selects each example's explained class, and those classes."""
    if plan.binary:
        classes, seed = _binary_classes_and_seed(explained, class_index)
        return seed, classes
    classes = _explained_classes(explained, plan.num_classes, class_index)
    if plan.num_classes == 1 and len(plan.explained.shape) == 1:
        seed = tf.ones_like(explained)
    else:
        seed = tf.one_hot(classes, plan.num_classes, dtype=explained.dtype)
    return seed, classes


def _explain_with_cam(forward: Forward, plan: ExplainPlan, inputs: dict[str, tf.Tensor], class_index: tf.Tensor,
                      cam: cam_maps.CamOptions):
    """_explain's outputs plus gradcam and guided_gradcam, from the same forward pass (gbp_rewrite.cam)."""
    result, classes = cam_maps.explain(
        forward, plan, inputs, class_index, cam,
        seed_and_classes=lambda explained: _seed_and_classes(explained, plan, class_index),
    )
    for map_key, saliency_key in plan.saliency_maps.items():
        result[map_key] = _saliency_map(result[saliency_key])
    result[EXPLAINED_CLASS] = classes
    return result


def _saliency_map(saliency: tf.Tensor) -> tf.Tensor:
    """[batch, H, W, C] -> [batch, H, W] float32: max |saliency| over channels / its per-example max."""
    magnitude = tf.reduce_max(tf.abs(tf.cast(saliency, tf.float32)), axis=-1)
    peak = tf.reduce_max(magnitude, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(magnitude, peak)  # an all-zero map stays zero, not NaN


def _explained_classes(explained: tf.Tensor, num_classes: int, class_index: tf.Tensor) -> tf.Tensor:
    """The class explained per example: `class_index`, or the top class where it is -1."""
    if num_classes == 1:
        top = tf.zeros_like(class_index)
    else:
        top = tf.argmax(explained, axis=-1, output_type=tf.int64)
    return tf.where(class_index < 0, top, class_index)


def _binary_classes_and_seed(probability: tf.Tensor, class_index: tf.Tensor):
    """A binary sigmoid output p: the class per example (`class_index`, or 1 where p > 0.5 and 0
    where -1) and the seed: +1 for class 1 (score z, or p), -1 for class 0 (score -z, or 1 - p).

    The seed's sign is the score's, not a flip of the map: the guided gate sees the negated
    upstream gradient.
    """
    p = tf.reshape(probability, [-1])
    predicted = tf.cast(p > tf.constant(0.5, p.dtype), tf.int64)
    classes = tf.where(class_index < 0, predicted, class_index)
    sign = tf.where(classes > 0, tf.ones_like(p), -tf.ones_like(p))
    return classes, tf.reshape(sign, tf.shape(probability))


def _checked_classes(class_index: tf.Tensor, batch_input: tf.Tensor, num_classes: int) -> tf.Tensor:
    """`class_index` after run-time checks: one per example, each in [0, num_classes)."""
    checks = [
        tf.debugging.assert_equal(
            tf.shape(class_index, out_type=tf.int64)[0], tf.shape(batch_input, out_type=tf.int64)[0],
            message="class_index must hold one class per example of the batch",
        ),
        tf.debugging.assert_non_negative(class_index, message="class_index must be >= 0"),
        tf.debugging.assert_less(
            class_index, tf.constant(num_classes, tf.int64),
            message=f"class_index must be < {num_classes}, the number of classes",
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(class_index)


def build_signatures(
    forward: Forward, plan: ExplainPlan, *, cam: cam_maps.CamOptions | None = None,
) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """The two explainable signatures as concrete functions, keyed by signature name.

    Both call one traced core, so the forward and backward graphs are built (and saved) once;
    `serving_default` passes class -1 ("the top class") for every example. With `cam` (a plan
    made with cam=True), `forward` must build its ops inline (gbp_rewrite.cam) and the core also
    returns gradcam and guided_gradcam; `cam.chosen` names the layer afterwards.
    """
    specs = {key: desc.spec() for key, desc in plan.inputs.items()}
    batch_source = next(iter(plan.saliency_outputs.values()))

    # autograph=False: no Python control flow depends on tensors here, and tracing is faster.
    @tf.function(autograph=False)
    def core(inputs, class_index):
        if cam is not None:
            return _explain_with_cam(forward, plan, inputs, class_index, cam)
        return _explain(forward, plan, inputs, class_index)

    @tf.function(autograph=False)
    def serve(**inputs):
        top = tf.fill(tf.shape(inputs[batch_source], out_type=tf.int64)[:1], tf.constant(-1, tf.int64))
        return core(inputs, top)

    @tf.function(autograph=False)
    def explain_class(**inputs):
        class_index = inputs.pop(CLASS_INDEX)
        return core(inputs, _checked_classes(class_index, inputs[batch_source], plan.class_count))

    class_spec = tf.TensorSpec([None], tf.int64, name=CLASS_INDEX)
    return {
        plan.signature_key: serve.get_concrete_function(**specs),
        EXPLAIN_CLASS_SIGNATURE: explain_class.get_concrete_function(**specs, **{CLASS_INDEX: class_spec}),
    }


def variables_of(owner) -> list[tf.Variable]:
    """Every variable reachable from `owner` through tracked attributes, once each."""
    return [t for t in _state_of(owner) if isinstance(t, tf.Variable)]


def _state_of(owner) -> list:
    """The variables, resources (lookup tables, ...) and asset files reachable from `owner`."""
    kinds = (tf.Variable, tf.saved_model.experimental.TrackableResource, tf.saved_model.Asset)
    found = {}
    for trackable in tf.train.TrackableView(owner).descendants():
        if isinstance(trackable, kinds):
            found.setdefault(id(trackable), trackable)
    return list(found.values())


def save(
    directory: Path,
    *,
    owner,
    signatures: Mapping[str, tf.types.experimental.ConcreteFunction],
) -> None:
    """Write the SavedModel; `owner` holds the variables (they stay variables, not constants).

    Only the variables the signatures capture and the owner's resources (lookup tables, ...) and
    assets are saved with the signatures, not the owner's other functions: re-serialising every
    restored function of a large model would double the conversion time and the export's graph.
    Should a signature capture something that misses, the whole owner is saved instead.
    """
    # Custom gradients must not be saved: TensorFlow would call our registered gradient functions
    # with op=None. The saliency is already ordinary ops (ReluGrad, Conv2DBackpropInput, ...).
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    captured = _captured_variables(signatures.values())
    try:
        root = _root(owner, variables=captured)
        tf.saved_model.save(root, str(directory), signatures=dict(signatures), options=options)
    except (ValueError, AssertionError, KeyError) as e:
        log.info("saving the signatures' state alone failed (%s); saving the whole owner", e)
        _empty(directory)
        root = _root(owner, variables=variables_of(owner), whole=True)
        tf.saved_model.save(root, str(directory), signatures=dict(signatures), options=options)
    finish_export(directory / "saved_model.pb")


def _captured_variables(functions) -> list[tf.Variable]:
    """The variables the signatures read, once each.

    Keras 3 exports track every weight twice (`variables` and `_all_variables`, distinct objects);
    saving only what the signatures capture keeps one copy.
    """
    found = {}
    for function in functions:
        for variable in function.variables:
            found.setdefault(id(variable), variable)
    return list(found.values())


def _root(owner, *, variables: list[tf.Variable], whole: bool = False):
    root = tf_internals.AutoTrackable()
    if whole:
        root.source = owner
    else:
        root.state = [t for t in _state_of(owner) if not isinstance(t, tf.Variable)]
    # Listed at the root so that `tf.saved_model.load(dir).variables` works for every consumer.
    root.variables = list(variables)
    return root


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
