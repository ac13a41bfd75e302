"""Deterministic damage for the fuzz tests: broken copies of good SavedModels and .keras files.

Every function takes a `random.Random`, so a case is reproduced from its seed alone:

    damage_savedmodel(good_dir, copy_dir, rng)  -> a note saying what was broken
    damage_keras_file(good_file, copy_file, rng) -> a note

SavedModel damage: a truncated or bit-flipped saved_model.pb, a *structural* mutation (the file
still parses, but a field of the graph holds nonsense: a deleted function or node input, a renamed
map key, a dtype enum TensorFlow does not know, a dimension of 2**40, a dangling tensor name), a
missing, short or bit-flipped variables file, a deleted or emptied asset. Keras damage: a broken
config.json (a key deleted, a value of the wrong type, an unknown or unsafe class), a truncated
config, a truncated or bit-flipped zip, a missing member.
"""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

from google.protobuf import descriptor
from tensorflow.core.protobuf import saved_model_pb2

_FD = descriptor.FieldDescriptor
_INT_TYPES = {_FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_SINT32,
              _FD.TYPE_SINT64, _FD.TYPE_FIXED32, _FD.TYPE_FIXED64, _FD.TYPE_SFIXED32, _FD.TYPE_SFIXED64}
_INTS = [0, 1, -1, 2, 3, 7, 255, 1000, 2**20, 2**31 - 1, -2**31, 2**40, 2**62]
_ENUMS = [0, 1, 2, 3, 5, 7, 9, 10, 17, 20, 21, 23, 99, 101, 1000]  # DataType: valid, ref, unknown
_NAMES = ["", "x", "a:b:c", "n:0:9", "^x", "n:-1", "n:99999999999999999999"]

SAVEDMODEL_DAMAGE = ("truncate_pb", "flip_pb", "mutate_pb", "mutate_pb", "mutate_pb", "variables_missing",
                     "variables_short", "variables_flip", "asset")


def damage_savedmodel(good: Path, copy: Path, rng: random.Random) -> str:
    """Copy the SavedModel `good` to `copy` and break it one way; return '<kind>: what was done'."""
    shutil.copytree(good, copy)
    has_assets = any((copy / "assets").glob("*")) if (copy / "assets").is_dir() else False
    kind = rng.choice([k for k in SAVEDMODEL_DAMAGE if has_assets or k != "asset"])
    return f"{kind}: {_damage_savedmodel(copy, rng, kind)}"


def _damage_savedmodel(copy: Path, rng: random.Random, kind: str) -> str:
    pb = copy / "saved_model.pb"
    if kind == "truncate_pb":
        return "saved_model.pb " + _truncated(pb, pb, rng)
    if kind == "flip_pb":
        return "saved_model.pb: " + _flip_bits(pb, rng, rng.randint(1, 8))
    if kind == "mutate_pb":
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString(pb.read_bytes())
        notes = [_mutate_message(proto, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        pb.write_bytes(proto.SerializeToString())
        return "saved_model.pb mutated: " + "; ".join(notes)
    if kind.startswith("variables_"):
        victim = rng.choice(sorted((copy / "variables").iterdir()))
        if kind == "variables_missing":
            victim.unlink()
            return f"{victim.name} deleted"
        if kind == "variables_short":
            data = victim.read_bytes()
            victim.write_bytes(data[: rng.randrange(max(1, len(data)))])
            return f"{victim.name} truncated"
        return f"{victim.name}: " + _flip_bits(victim, rng, rng.randint(1, 4))
    if kind == "asset":
        assets = sorted((copy / "assets").glob("*")) if (copy / "assets").is_dir() else []
        if not assets:
            shutil.rmtree(copy / "assets", ignore_errors=True)
            return "assets/ deleted (it held no file)"
        victim = rng.choice(assets)
        if rng.random() < 0.5:
            victim.unlink()
            return f"asset {victim.name} deleted"
        victim.write_bytes(b"")
        return f"asset {victim.name} emptied"
    raise ValueError(kind)


def _flip_bits(path: Path, rng: random.Random, count: int) -> str:
    data = bytearray(path.read_bytes())
    offsets = [rng.randrange(len(data)) for _ in range(count)]
    for offset in offsets:
        data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"{count} bit(s) flipped at {offsets}"


# ---------------------------------------------------------------------------------------------
# Structural protobuf mutations: the file parses, the graph is nonsense


def _positions(message, found: list) -> None:
    """(message, field, index) for every set field, recursively; index 'list'/'map' = the container."""
    for field, value in message.ListFields():
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                found.append((message, field, "map"))
                if field.message_type.fields_by_name["value"].message_type is not None:
                    for item in value.values():
                        _positions(item, found)
                continue
            found.append((message, field, "list"))
            for index, item in enumerate(value):
                if field.message_type is not None:
                    _positions(item, found)
                else:
                    found.append((message, field, index))
        else:
            found.append((message, field, None))
            if field.message_type is not None:
                _positions(value, found)


def _strings_in(positions) -> list[str]:
    strings = []
    for message, field, index in positions:
        if field.type == _FD.TYPE_STRING and index not in ("list", "map"):
            value = getattr(message, field.name)
            strings.append(value if index is None else value[index])
    return strings


def _mutate_message(root, rng: random.Random) -> str:
    positions: list = []
    _positions(root, positions)
    message, field, index = rng.choice(positions)
    if index == "list":
        return _mutate_list(getattr(message, field.name), field, rng)
    if index == "map":
        return _mutate_map(getattr(message, field.name), field, rng, _strings_in(positions))
    if field.message_type is not None:
        message.ClearField(field.name)
        return f"{field.full_name} cleared"
    old = getattr(message, field.name) if index is None else getattr(message, field.name)[index]
    new = _new_scalar(field, old, rng, _strings_in(positions))
    try:
        if index is None:
            setattr(message, field.name, new)
        else:
            getattr(message, field.name)[index] = new
    except (ValueError, TypeError):
        return f"{field.full_name} left alone ({new!r} not storable)"
    return f"{field.full_name} {str(old)[:30]!r} -> {str(new)[:30]!r}"


def _mutate_list(items, field, rng: random.Random) -> str:
    if not len(items):
        return f"{field.full_name} left alone (empty)"
    i = rng.randrange(len(items))
    action = rng.choice(["delete", "delete", "duplicate", "swap"])
    if action == "delete":
        del items[i]
    elif action == "duplicate":
        if field.message_type is not None:
            items.add().CopyFrom(items[i])
        else:
            items.append(items[i])
    else:
        j = rng.randrange(len(items))
        if field.message_type is not None:
            a, b = type(items[i])(), type(items[j])()
            a.CopyFrom(items[i])
            b.CopyFrom(items[j])
            items[i].CopyFrom(b)
            items[j].CopyFrom(a)
        else:
            items[i], items[j] = items[j], items[i]
    return f"{field.full_name}[{i}] {action}"


def _mutate_map(mapping, field, rng: random.Random, strings: list[str]) -> str:
    keys = sorted(mapping.keys())
    if not keys:
        return f"{field.full_name} left alone (empty)"
    key = rng.choice(keys)
    if rng.random() < 0.6 or not isinstance(key, str):
        del mapping[key]
        return f"{field.full_name}[{key!r}] deleted"
    new_key = rng.choice(strings or ["x"])
    if field.message_type.fields_by_name["value"].message_type is not None:
        value = type(mapping[key])()
        value.CopyFrom(mapping[key])
        del mapping[key]
        mapping[new_key].CopyFrom(value)
    else:
        value = mapping[key]
        del mapping[key]
        mapping[new_key] = value
    return f"{field.full_name}[{key!r}] renamed {new_key!r}"


def _new_scalar(field, old, rng: random.Random, strings: list[str]):
    if field.type in _INT_TYPES:
        value = rng.choice(_INTS)
        if field.type in (_FD.TYPE_UINT32, _FD.TYPE_FIXED32, _FD.TYPE_UINT64, _FD.TYPE_FIXED64):
            value = abs(value) % 2**32
        elif field.type in (_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32):
            value = max(min(value, 2**31 - 1), -2**31)
        return value
    if field.type == _FD.TYPE_ENUM:
        return rng.choice(_ENUMS)
    if field.type == _FD.TYPE_BOOL:
        return not old
    if field.type in (_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE):
        return rng.choice([0.0, -1.0, 1e38, float("nan"), float("inf")])
    if field.type == _FD.TYPE_STRING:  # another name of the same graph: dangling refs, cycles
        return rng.choice(strings + _NAMES)
    return rng.choice([b"", b"\x00\xff", old[: len(old) // 2], b"x" * 9])


# ---------------------------------------------------------------------------------------------
# .keras files

KERAS_DAMAGE = ("config", "config", "config", "config_text", "truncate", "flip", "drop_member", "metadata")
_CONFIG_VALUES = [None, -1, 0, 2**40, 1e308, "", "relu", "nonsense", [], {}, [None], True, "Lambda", 7.5]


def _truncated(source: Path, target: Path, rng: random.Random) -> str:
    """Write a random prefix of `source` to `target` (they may be the same file); say how long."""
    data = source.read_bytes()
    cut = rng.randrange(len(data))
    target.write_bytes(data[:cut])
    return f"truncated to {cut} of {len(data)} bytes"


def damage_keras_file(good: Path, copy: Path, rng: random.Random) -> str:
    """Write a broken copy of the .keras file `good` to `copy`; return 'keras_<kind>: what was done'."""
    kind = rng.choice(KERAS_DAMAGE)
    return f"keras_{kind}: {_damage_keras_file(good, copy, rng, kind)}"


def _damage_keras_file(good: Path, copy: Path, rng: random.Random, kind: str) -> str:
    if kind == "truncate":
        return "zip " + _truncated(good, copy, rng)
    if kind == "flip":
        shutil.copyfile(good, copy)
        return "zip: " + _flip_bits(copy, rng, rng.randint(1, 6))
    members = _zip_members(good)
    if kind == "config":
        config = json.loads(members["config.json"])
        note = "config.json: " + "; ".join(_mutate_config(config, rng) for _ in range(rng.randint(1, 3)))
        members["config.json"] = json.dumps(config).encode()
    elif kind == "config_text":
        text = members["config.json"]
        members["config.json"] = text[: rng.randrange(len(text))]
        note = "config.json truncated"
    elif kind == "drop_member":
        victim = rng.choice(sorted(members))
        del members[victim]
        note = f"{victim} removed from the zip"
    elif kind == "metadata":
        members["metadata.json"] = rng.choice([b"", b"{", b'{"keras_version": 3}', b"[]"])
        note = f"metadata.json = {members['metadata.json']!r}"
    else:
        raise ValueError(kind)
    _write_zip(copy, members)
    return note


def _zip_members(path: Path) -> dict[str, bytes]:
    """name -> bytes of every member of the zip file `path` (a .keras file), in archive order."""
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    """Write `members` (name -> bytes) as the zip file `path`."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_paths(item, prefix + (index,))


def _mutate_config(config: dict, rng: random.Random) -> str:
    action = rng.choice(["delete", "value", "value", "value", "class"])
    layers = config.get("config", {}).get("layers") if isinstance(config.get("config"), dict) else None
    if action == "class" and isinstance(layers, list) and layers and isinstance(layers[0], dict):
        layer = rng.choice([item for item in layers if isinstance(item, dict)])
        layer["class_name"] = rng.choice(["NoSuchLayer", "Lambda", "Functional", "Dense", "system"])
        if rng.random() < 0.3:  # an importable module that is not Keras: safe mode must refuse it
            layer["module"] = rng.choice(["os", "builtins", "subprocess"])
        return f"a layer's class set to {layer.get('module', 'keras.layers')}.{layer['class_name']}"
    paths = [path for path in _json_paths(config) if path]
    path = rng.choice(paths)
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
        return f"{'/'.join(map(str, path))} deleted"
    parent[path[-1]] = rng.choice(_CONFIG_VALUES)
    return f"{'/'.join(map(str, path))} = {parent[path[-1]]!r}"


# ---------------------------------------------------------------------------------------------
# Targeted damage: each crash the fuzz found, reproduced on purpose (regression cases)


def _signature(meta_graph):
    return meta_graph.signature_def["serving_default"]


def _first(mapping):
    return mapping[sorted(mapping)[0]]


def _input_dtype_99(meta_graph):
    _first(_signature(meta_graph).inputs).dtype = 99  # was: AttributeError describing it


def _input_dim_2_40(meta_graph):
    _first(_signature(meta_graph).inputs).tensor_shape.dim[1].size = 2**40  # was: MemoryError


def _input_shape_disagrees(meta_graph):
    _first(_signature(meta_graph).inputs).tensor_shape.dim[2].size = 2  # was: TypeError tracing


def _function_output_is_variant(meta_graph):
    """The function's own output spec (object graph) says variant; the signature_def says float32."""
    for name, function in meta_graph.object_graph_def.concrete_functions.items():
        if "signature_wrapper" in name:
            for field in function.output_signature.dict_value.fields.values():
                field.tensor_spec_value.dtype = 21  # DT_VARIANT; was: TypeError in tf.argmax


def _output_name_malformed(meta_graph):
    output = _first(_signature(meta_graph).outputs)
    output.name = output.name.split(":")[0] + ":x"  # was: ValueError in sites._split_ref


def _signature_map_renamed(meta_graph):
    nodes = meta_graph.object_graph_def.nodes
    signatures = next(c.node_id for c in nodes[0].children if c.local_name == "signatures")
    for child in nodes[signatures].children:
        if child.local_name == "serving_default":
            child.local_name = "config"  # was: KeyError 'serving_default'


def _signatures_not_a_map(meta_graph):
    nodes = meta_graph.object_graph_def.nodes
    function = next(i for i, node in enumerate(nodes) if node.WhichOneof("kind") == "function")
    for child in nodes[0].children:
        if child.local_name == "signatures":
            child.node_id = function  # was: TypeError 'RestoredFunction' object is not subscriptable


def _placeholder_of_any_rank(meta_graph):
    """TF1: the placeholder takes any rank, the signature_def claims rank 3. Was: a C++ CHECK
    failure in the oneDNN Conv2D kernel on the rank-3 probe, aborting the process."""
    placeholder = next(node for node in meta_graph.graph_def.node if node.op == "Placeholder")
    for attr in ("shape", "_output_shapes"):
        if attr in placeholder.attr:
            shape = placeholder.attr[attr].shape if attr == "shape" else placeholder.attr[attr].list.shape[0]
            shape.Clear()
            shape.unknown_rank = True
    del _first(_signature(meta_graph).inputs).tensor_shape.dim[3]


def _input_of_2_42_values(meta_graph):
    """TF1: the placeholder and the signature agree on [?, 2**20, 2**20, 3] (and no node's
    _output_shapes contradicts it). Was: MemoryError allocating the probe batch."""
    for node in meta_graph.graph_def.node:
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
        if node.op == "Placeholder":
            node.attr["shape"].shape.dim[1].size = node.attr["shape"].shape.dim[2].size = 2**20
    dims = _first(_signature(meta_graph).inputs).tensor_shape.dim
    dims[1].size = dims[2].size = 2**20


def _variable_collection_garbage(meta_graph):
    meta_graph.collection_def["variables"].bytes_list.value[0] = b"\x00\xff"  # was: DecodeError


def _keras_layer_called_with_a_string_mask(config: dict):
    """Loads fine, fails when called. Was: AttributeError from Softmax.call while tracing."""
    layer = [layer for layer in config["config"]["layers"] if layer.get("inbound_nodes")][-1]
    layer["inbound_nodes"][0]["kwargs"]["mask"] = "os"


# name -> (base family, mutation of the serving meta graph (of config.json for "keras"), a phrase
# the one-line error must hold)
TARGETED = {
    "input dtype 99": ("tf2_module@cnn", _input_dtype_99, "data type number 99"),
    "input dim 2**40": ("keras3@cnn", _input_dim_2_40, "1099511627776"),
    "input shape disagrees with the function": ("tf_keras@cnn", _input_shape_disagrees, "but its function uses"),
    "function output is variant": ("tf2_module@cnn", _function_output_is_variant, "variant"),
    "malformed output tensor name": ("keras3@cnn", _output_name_malformed, "not in the graph"),
    "signature renamed in the object graph": ("vocabulary", _signature_map_renamed, "lists signature"),
    "signatures object is a function": ("tf2_module@cnn", _signatures_not_a_map, "without a signature map"),
    "placeholder of any rank": ("tf1@cnn", _placeholder_of_any_rank, "unknown rank"),
    "input of 2**42 values": ("tf1@cnn", _input_of_2_42_values, "for a probe batch of 2"),
    "garbage in the variables collection": ("tf1@cnn", _variable_collection_garbage, "VariableDef"),
    "keras layer called with a string mask": ("keras", _keras_layer_called_with_a_string_mask,
                                              "fails when called on its inputs"),
}


def damage_targeted(name: str, good: Path, copy: Path) -> str:
    """Copy `good` to `copy` and apply TARGETED[name]; return 'targeted: name'."""
    family, mutate, _ = TARGETED[name]
    if family == "keras":
        members = _zip_members(good)
        config = json.loads(members["config.json"])
        mutate(config)
        members["config.json"] = json.dumps(config).encode()
        _write_zip(copy, members)
        return f"targeted: {name}"
    shutil.copytree(good, copy)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((copy / "saved_model.pb").read_bytes())
    mutate(proto.meta_graphs[0])
    (copy / "saved_model.pb").write_bytes(proto.SerializeToString())
    return f"targeted: {name}"
