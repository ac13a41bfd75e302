"""An independent Python model of TF Serving's REST JSON handling, for the tests.

It follows tensorflow_serving/util/json_tensor.cc (FillPredictRequestFromJson with
FillTensorMapFromInstancesList / FillTensorMapFromInputsMap for requests;
MakeRowFormatJsonFromTensors / MakeColumnarFormatJsonFromTensors and WriteDecimal for responses)
and the format documented in tensorflow_serving/g3doc/api_rest.md. It shares no code with
gbp_rewrite.serving.rest, so a test that passes both agrees with the server, not with itself.
"""

from __future__ import annotations

import base64
import json

import numpy as np


class JsonTensorError(ValueError):
    """What TF Serving would answer as {"error": ...} (InvalidArgument)."""


# ---------------------------------------------------------------------------------------------
# Requests: JSON -> tensors, as the server parses them


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_element_object(value) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _shape(value) -> list[int]:
    """GetDenseTensorShape: the sizes along the first element of each nesting level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _leaf(value, dtype: np.dtype):
    """AddValueToTensor: the JSON type must match the dtype exactly."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        if type(value) not in (int, float):  # bool is not a JSON number
            raise JsonTensorError(f"JSON Value: {value!r} is not of expected type: {dtype}")
        if np.isfinite(value) and abs(value) > np.finfo(dtype).max:
            raise JsonTensorError(f"Cannot convert JSON value: {value} to {dtype} without loss of precision.")
        return value
    if kind in "iu":
        if type(value) is not int:
            raise JsonTensorError(f"JSON Value: {value!r} is not of expected type: {dtype}")
        return value
    if kind == "b":
        if type(value) is not bool:
            raise JsonTensorError(f"JSON Value: {value!r} is not of expected type: bool")
        return value
    if kind in "SO":
        if _is_b64(value):
            return base64.b64decode(value["b64"])
        if type(value) is not str:
            raise JsonTensorError(f"JSON Value: {value!r} is not of expected type: string")
        return value.encode()
    raise JsonTensorError(f"Conversion of JSON Value to type {dtype} is not implemented")


def _fill(value, shape: list[int], level: int, dtype, out: list) -> None:
    """FillTensorProto: leaves exactly at depth rank, every list of the size its level expects."""
    if not isinstance(value, list):
        if level != len(shape):
            raise JsonTensorError(f"JSON Value: {value!r} found at incorrect level: {level + 1}")
        out.append(_leaf(value, dtype))
        return
    if level >= len(shape):
        raise JsonTensorError(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise JsonTensorError(f"Encountered list at unexpected size: {len(value)} at level: {level}")
    for item in value:
        _fill(item, shape, level + 1, dtype, out)


def _tensor(value, dtype) -> np.ndarray:
    shape = _shape(value)
    flat: list = []
    _fill(value, shape, 0, dtype, flat)
    return np.array(flat, dtype=dtype).reshape(shape)


def parse_predict_request(text: str, inputs: dict[str, np.dtype]) -> tuple[str | None, dict[str, np.ndarray], str]:
    """(signature_name, tensors by input name, "row" or "columnar") the server would feed."""
    doc = json.loads(text)  # Python's json reads NaN/Infinity, as rapidjson's kParseNanAndInfFlag
    if not isinstance(doc, dict):
        raise JsonTensorError("Is not object")
    signature = doc.get("signature_name")
    if signature is not None and not isinstance(signature, str):
        raise JsonTensorError("'signature_name' key must be a string value.")
    if "instances" in doc and "inputs" in doc:
        raise JsonTensorError("expecting only one of 'inputs' or 'instances' keys to exist")
    if "instances" in doc:
        return signature, _from_instances(doc["instances"], inputs), "row"
    if "inputs" in doc:
        return signature, _from_inputs(doc["inputs"], inputs), "columnar"
    raise JsonTensorError("Missing 'inputs' or 'instances' key")


def _from_instances(instances, inputs: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise JsonTensorError("Excepting 'instances' to be an list/array")
    if not instances:
        raise JsonTensorError("No values in 'instances' array")
    if not isinstance(instances[0], dict) and len(inputs) > 1:
        raise JsonTensorError("instances is a plain list, but expecting list of objects as multiple input tensors")
    objects = _is_element_object(instances[0])
    rows: dict[str, list[np.ndarray]] = {}
    for index, element in enumerate(instances):
        if objects:
            if not _is_element_object(element):
                raise JsonTensorError(f"Expecting object but got list at item {index} of input list")
            if set(element) != set(inputs):
                raise JsonTensorError(f"JSON object keys must be equal to: {','.join(sorted(inputs))}")
            items = element.items()
        else:
            if _is_element_object(element):
                raise JsonTensorError(f"Expecting value/list but got object at item {index} of input list")
            items = [(next(iter(inputs)), element)]
        for name, value in items:
            tensor = _tensor(value, inputs[name])
            previous = rows.setdefault(name, [])
            if previous and previous[0].shape != tensor.shape:
                raise JsonTensorError(f"Expecting shape {list(previous[0].shape)} but got: {list(tensor.shape)}")
            previous.append(tensor)
    return {name: np.stack(values) for name, values in rows.items()}


def _from_inputs(value, inputs: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or _is_b64(value):
        if len(inputs) > 1:
            raise JsonTensorError("inputs is a plain value/list, but expecting an object")
        name = next(iter(inputs))
        return {name: _tensor(value, inputs[name])}
    missing = [name for name in inputs if name not in value]
    if missing:
        raise JsonTensorError(f"Missing named input: {missing[0]} in 'inputs' object.")
    return {name: _tensor(value[name], dtype) for name, dtype in inputs.items()}


# ---------------------------------------------------------------------------------------------
# Responses: tensors -> JSON, as the server writes them


def write_decimal(value) -> str:
    """WriteDecimal: six significant digits when that round-trips, else max_digits10; '.0' added."""
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    dtype = type(value)
    text = f"{value:.6g}"  # absl::StrCat(float) formats with six significant digits
    if dtype(float(text)) != value:
        text = f"{value:.{9 if dtype == np.float32 else 17}g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _scalar(value, name: str) -> str:
    if isinstance(value, (np.floating,)):
        if value.dtype == np.float16:  # written through float, as the server does
            value = np.float32(value)
        return write_decimal(value)
    if isinstance(value, np.bool_):
        return "true" if value else "false"
    if isinstance(value, np.integer):
        return str(int(value))
    if isinstance(value, bytes):
        if name.endswith("_bytes"):
            return json.dumps({"b64": base64.b64encode(value).decode()})
        return json.dumps(value.decode())
    raise JsonTensorError(f"Failed to write JSON value for tensor type: {type(value)}")


def _values(array: np.ndarray, name: str) -> str:
    """AddTensorValues: nested lists, scalars bare."""
    if not isinstance(array, np.ndarray):  # an element of an object (string) array
        return _scalar(array, name)
    if array.ndim == 0:
        return _scalar(array[()], name)
    return "[" + ",".join(_values(item, name) for item in array) + "]"


def _tensor_order(tensors: dict[str, np.ndarray]) -> list[str]:
    # A protobuf Map has no defined order: write them reversed, so no reader may rely on it.
    return sorted(tensors, reverse=True)


def row_format_response(tensors: dict[str, np.ndarray]) -> str:
    """MakeRowFormatJsonFromTensors: one object per example (bare values for one output)."""
    batch = None
    for name, tensor in tensors.items():
        if tensor.ndim == 0:
            raise JsonTensorError(f"Tensor name: {name} has no shape information ")
        if batch is not None and tensor.shape[0] != batch:
            raise JsonTensorError(f"Tensor name: {name} has inconsistent batch size: {tensor.shape[0]} expecting: {batch}")
        batch = tensor.shape[0]
    names = _tensor_order(tensors)
    items = []
    for index in range(batch):
        if len(names) > 1:
            items.append("{" + ",".join(f"{json.dumps(n)}:{_values(tensors[n][index], n)}" for n in names) + "}")
        else:
            items.append(_values(tensors[names[0]][index], names[0]))
    return '{"predictions":[' + ",".join(items) + "]}"


def columnar_response(tensors: dict[str, np.ndarray]) -> str:
    """MakeColumnarFormatJsonFromTensors: {"outputs": {name: whole tensor}} (bare for one output)."""
    names = _tensor_order(tensors)
    if len(names) == 1:
        return '{"outputs":' + _values(tensors[names[0]], names[0]) + "}"
    return '{"outputs":{' + ",".join(f"{json.dumps(n)}:{_values(tensors[n], n)}" for n in names) + "}}"
