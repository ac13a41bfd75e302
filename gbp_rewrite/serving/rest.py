"""TF Serving's REST predict API: request bodies from arrays, and responses back into arrays.

The format, as documented in tensorflow_serving/g3doc/api_rest.md and implemented in
tensorflow_serving/util/json_tensor.cc:

    request, row format   {"signature_name": KEY, "instances": [{"image": [[[...]]]}, ...]}
                          one object per example keyed by input name (or bare values when the
                          signature has one input); every input must share the batch size
    request, columnar     {"signature_name": KEY, "inputs": {"image": [[[[...]]]]}}
    response, row format  {"predictions": [{"output_0": [...], "saliency": [...], ...}, ...]}
                          one object per example keyed by output name, or bare values when the
                          signature has one output; every output must keep the batch dimension
    response, columnar    {"outputs": {"output_0": [[...]], ...}} (bare value for one output)
    error                 {"error": "message"}

Floats may be NaN, Infinity or -Infinity (JSON extensions TF Serving reads and writes); strings
that hold bytes are {"b64": "..."}. JSON carries no dtypes: decoded floats are float32 and
integers int64 unless `dtypes` says otherwise (TF Serving writes float32 with up to 9 significant
digits, so float32 outputs come back exactly).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Mapping

import numpy as np

from gbp_rewrite.errors import RestFormatError

B64_KEY = "b64"


# ---------------------------------------------------------------------------------------------
# Requests


def request_body(
    inputs: Mapping[str, np.ndarray], *, signature_name: str | None = None, columnar: bool = False,
) -> dict[str, Any]:
    """The JSON-ready body of a predict request for the batched `inputs` (row format by default).

    Row format writes one object per example keyed by input name (valid for one input or many).
    """
    if not inputs:
        raise RestFormatError("a predict request needs at least one input")
    arrays = {key: np.asarray(value) for key, value in inputs.items()}
    body: dict[str, Any] = {} if signature_name is None else {"signature_name": signature_name}
    if columnar:
        body["inputs"] = {key: _to_json(value) for key, value in arrays.items()}
        return body
    sizes = {key: (value.shape[0] if value.ndim else None) for key, value in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise RestFormatError(
            f"the row format needs every input to have the same batch size; got "
            f"{', '.join(f'{k}: {v}' for k, v in sizes.items())} (use columnar=True)"
        )
    columns = {key: _to_json(value) for key, value in arrays.items()}
    batch = next(iter(sizes.values()))
    body["instances"] = [{key: column[i] for key, column in columns.items()} for i in range(batch)]
    return body


def dumps(body: Mapping[str, Any]) -> str:
    """Serialise a body compactly; NaN and Infinity are written as the tokens TF Serving reads."""
    return json.dumps(body, separators=(",", ":"), allow_nan=True)


def _to_json(array: np.ndarray):
    """Nested lists; float16/32 values in their shortest decimal form that reads back exactly."""
    if array.dtype in (np.float16, np.float32):
        # numpy's str() of a float32 is its shortest round-trip repr ('0.003921569', not
        # '0.003921568859368563'): requests stay small and still parse to the same float32.
        return array.astype(str).astype(np.float64).tolist()
    if array.dtype.kind in "SO":
        return _strings_to_json(array.tolist())
    if array.dtype.kind in "fiub":
        return array.tolist()
    raise RestFormatError(f"TF Serving's REST API has no JSON form for dtype {array.dtype}")


def _strings_to_json(value):
    if isinstance(value, list):
        return [_strings_to_json(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {B64_KEY: base64.b64encode(value).decode("ascii")}
    return value


# ---------------------------------------------------------------------------------------------
# Responses


def decode_response(
    response: str | bytes | Mapping[str, Any],
    *,
    dtypes: Mapping[str, Any] | None = None,
    single_output: str = "output",
) -> dict[str, np.ndarray]:
    """Turn a predict response (row or columnar format) into {output key: batched array}.

    Args:
      response: the response body (JSON text or the parsed object).
      dtypes: numpy dtypes by output key; by default floats become float32, integers int64,
        booleans bool and strings bytes.
      single_output: the key to use when the response omits the output name (one output).

    Raises:
      RestFormatError: the body is TF Serving's {"error": ...}, or not a predict response.
    """
    body = _parse(response)
    if "error" in body:
        raise RestFormatError(f"TF Serving returned an error: {body['error']}")
    if "predictions" in body:
        columns = _row_columns(body["predictions"], single_output)
    elif "outputs" in body:
        outputs = body["outputs"]
        columns = dict(outputs) if _is_named(outputs) else {single_output: outputs}
    else:
        raise RestFormatError(
            f"not a predict response: expected a 'predictions' (row format) or 'outputs' (columnar) "
            f"key, got {', '.join(map(repr, body)) or 'an empty object'}"
        )
    dtypes = dict(dtypes or {})
    return {key: _to_array(key, value, dtypes.get(key)) for key, value in columns.items()}


def _parse(response) -> dict:
    if isinstance(response, (str, bytes, bytearray)):
        try:
            response = json.loads(response)
        except ValueError as e:
            raise RestFormatError(f"the response is not JSON: {e}") from None
    if not isinstance(response, Mapping):
        raise RestFormatError(f"the response must be a JSON object, got {type(response).__name__}")
    return dict(response)


def _is_b64(value) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and isinstance(value.get(B64_KEY), str)


def _is_named(value) -> bool:
    """An object of named tensors (not a {"b64": ...} value)."""
    return isinstance(value, Mapping) and not _is_b64(value)


def _row_columns(predictions, single_output: str) -> dict[str, list]:
    if not isinstance(predictions, list) or not predictions:
        raise RestFormatError("'predictions' must be a non-empty list (one entry per example)")
    if not _is_named(predictions[0]):
        if any(_is_named(p) for p in predictions):
            raise RestFormatError("'predictions' mixes objects and bare values")
        return {single_output: predictions}
    keys = list(predictions[0])
    for index, example in enumerate(predictions):
        if not _is_named(example) or sorted(example) != sorted(keys):
            raise RestFormatError(
                f"example {index} of 'predictions' has keys {sorted(example) if _is_named(example) else example!r}; "
                f"expected {sorted(keys)}"
            )
    return {key: [example[key] for example in predictions] for key in keys}


def _to_array(key: str, value, dtype) -> np.ndarray:
    value = _decode_b64(value)
    try:
        array = np.asarray(value)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise RestFormatError(f"output {key!r} is not a rectangular array (examples differ in shape)")
    if dtype is not None:
        return array.astype(dtype)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "U":
        return np.char.encode(array, "utf-8")
    return array


def _decode_b64(value):
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    if _is_b64(value):
        return base64.b64decode(value[B64_KEY])
    return value
