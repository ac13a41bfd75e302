"""Turn a TF1 graph's reference variables (VariableV2) into resource variables, in place.

TensorFlow 2 loads a TF1 SavedModel by wrapping its graph; reference variables cannot become
Python variable objects there ("Unable to create a python object for variable ... because it is a
reference variable"), so a model that holds them cannot be re-saved with its weights. Rewriting the
graph as `tf.compat.v1.enable_resource_variables()` would have built it makes the variables
ordinary TF2 variables; the values still come from the same checkpoint, under the same names.

    VariableV2 v            -> VarHandleOp v (shared_name v)
    Identity(v) (v/read)    -> ReadVariableOp(v)
    Assign(v, value)        -> AssignVariableOp(v, value)         (initializers, save/restore)
    AssignAdd/AssignSub     -> AssignAddVariableOp/AssignSubVariableOp
    IsVariableInitialized   -> VarIsInitializedOp
    any other reader        -> reads through a new ReadVariableOp `v/gbp_read`
"""

from __future__ import annotations

from google.protobuf import message
from tensorflow.core.framework import variable_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite.errors import SourceModelError
from gbp_rewrite.graph.graph_walk import node_of

REF_VARIABLE_OPS = ("VariableV2", "Variable")
_ASSIGN_OPS = {"Assign": "AssignVariableOp", "AssignAdd": "AssignAddVariableOp", "AssignSub": "AssignSubVariableOp"}
# Ops that consume the reference itself (to mutate it) and have no resource counterpart here.
_REF_MUTATORS_PREFIXES = ("Apply", "ResourceApply", "SparseApply", "Scatter", "CountUpTo")
_VARIABLE_COLLECTIONS = ("variables", "trainable_variables", "local_variables", "model_variables",
                         "moving_average_variables")


def convert_ref_variables(meta_graph: meta_graph_pb2.MetaGraphDef) -> int:
    """Rewrite every reference variable of the top-level graph; return how many there were."""
    nodes = meta_graph.graph_def.node
    variables = {node.name: node for node in nodes if node.op in REF_VARIABLE_OPS}
    if not variables:
        return 0
    readers_needed: set[str] = set()
    for node in list(nodes):
        if node.name in variables:
            continue
        ref_inputs = [i for i, name in enumerate(node.input) if node_of(name) in variables and not name.startswith("^")]
        if not ref_inputs:
            continue
        _rewrite_consumer(node, ref_inputs, variables, readers_needed)
    for name in sorted(readers_needed):
        _add_reader(nodes, variables[name])
    for node in variables.values():
        _to_var_handle(node)
    _mark_collections_resource(meta_graph)
    return len(variables)


def _rewrite_consumer(node, ref_inputs, variables, readers_needed) -> None:
    first = node.input[ref_inputs[0]]
    if node.op == "Identity" and ref_inputs == [0]:
        dtype = node.attr["T"].type
        _reset(node, "ReadVariableOp", {"dtype": dtype})
    elif node.op in _ASSIGN_OPS and ref_inputs == [0]:
        dtype = node.attr["T"].type
        validate = node.attr["validate_shape"].b if "validate_shape" in node.attr else False
        attrs = {"dtype": dtype}
        _reset(node, _ASSIGN_OPS[node.op], attrs)
        if node.op == "AssignVariableOp":
            node.attr["validate_shape"].b = validate
    elif node.op == "IsVariableInitialized":
        _reset(node, "VarIsInitializedOp", {})
    elif node.op.startswith(_REF_MUTATORS_PREFIXES):
        raise SourceModelError(
            f"the TF1 graph updates the reference variable '{node_of(first)}' with a "
            f"{node.op} op ('{node.name}'), which gbp_rewrite cannot carry over; re-export the "
            "serving graph without training ops, or after tf.compat.v1.enable_resource_variables()"
        )
    else:
        for index in ref_inputs:
            variable = node_of(node.input[index])
            node.input[index] = f"{variable}/gbp_read"
            readers_needed.add(variable)


def _reset(node, op: str, attrs: dict) -> None:
    """Change a node's op, keeping only colocation hints from its old attrs."""
    kept = {k: v for k, v in node.attr.items() if k == "_class"}
    node.op = op
    node.ClearField("attr")
    for key, value in kept.items():
        node.attr[key].CopyFrom(value)
    for key, value in attrs.items():
        node.attr[key].type = value


def _add_reader(nodes, variable) -> None:
    reader = nodes.add()
    reader.name = f"{variable.name}/gbp_read"
    reader.op = "ReadVariableOp"
    reader.input.append(variable.name)
    reader.attr["dtype"].type = variable.attr["dtype"].type
    if variable.device:
        reader.device = variable.device


def _to_var_handle(node) -> None:
    dtype, shape = node.attr["dtype"].type, node.attr["shape"]
    container = node.attr["container"].s if "container" in node.attr else b""
    shared_name = node.attr["shared_name"].s if "shared_name" in node.attr else b""
    shape_copy = type(shape)()
    shape_copy.CopyFrom(shape)
    node.op = "VarHandleOp"
    node.ClearField("attr")
    node.attr["dtype"].type = dtype
    node.attr["shape"].CopyFrom(shape_copy)
    node.attr["container"].s = container
    node.attr["shared_name"].s = shared_name or node.name.encode()


def _mark_collections_resource(meta_graph) -> None:
    for key in _VARIABLE_COLLECTIONS:
        if key not in meta_graph.collection_def:
            continue
        values = meta_graph.collection_def[key].bytes_list.value
        for i, raw in enumerate(values):
            variable_def = variable_pb2.VariableDef()
            try:
                variable_def.ParseFromString(raw)
            except message.DecodeError:
                raise SourceModelError(
                    f"the TF1 graph's '{key}' collection holds a damaged VariableDef (entry {i}); "
                    "re-export the model"
                ) from None
            variable_def.is_resource = True
            values[i] = variable_def.SerializeToString()
