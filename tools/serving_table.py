"""Bytes on the wire and client-to-result time per image through the stand-in.

The table in docs/serving-in-production.md.

    .venv/bin/python tools/serving_table.py                       # testdata CNN and ResNet50
    .venv/bin/python tools/serving_table.py --models shapes_cnn --rounds 20

For each model: one export with every serving option (--image_bytes_signature, --saliency_map_dtype
uint8, --saliency_png), served by tests/grpc_stand_in.py (a test double of TF Serving on
127.0.0.1), called with gbp_rewrite.serving.Client at batch 1 with a 224x224 JPEG:

    float-JSON  REST, serving_default, the image as preprocessed float pixels (`request`'s body)
    b64-JSON    REST, serving_bytes, the JPEG as {"b64": ...}
    gRPC        serving_bytes, the JPEG as a DT_STRING TensorProto
    gRPC, PNG only   the same with output_filter: saliency_png_bytes, explained_class, output_0, image_size

Request and response sizes are the bytes of the HTTP body / the serialised protobuf message; the
response's bytes per output (saliency float32, saliency_map uint8, saliency_png_bytes PNG) are each
output's share of it (REST: its JSON alone; gRPC: its TensorProto). Times are medians of --rounds
calls (after 2 warm-up calls), from the client's call to the decoded arrays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_source(name: str, work: Path) -> Path:
    if name == "shapes_cnn":
        return REPO / "testdata" / "shapes_cnn"
    import keras

    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    path = work / "resnet50"
    model.export(str(path), verbose=False)
    return path


def jpeg_224() -> bytes:
    import tensorflow as tf

    pixels = tf.io.decode_png(tf.io.read_file(str(REPO / "testdata" / "images" / "circle_0.png")))
    big = tf.cast(tf.round(tf.image.resize(pixels, [224, 224])), tf.uint8)
    return tf.io.encode_jpeg(big, quality=90).numpy()


def timed(call, rounds: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


# What a web client needs: the picture, the class and the scores (PredictRequest.output_filter).
COMPACT = ["saliency_png_bytes", "explained_class", "output_0", "image_size"]


def output_shares(outputs: dict, protocol: str) -> dict[str, int]:
    import tensorflow as tf

    from gbp_rewrite.serving import rest

    shares = {}
    for key in ("saliency", "saliency_map", "saliency_png_bytes"):
        if key not in outputs:
            shares[key] = 0
            continue
        value = outputs[key]
        if protocol == "grpc":
            shares[key] = tf.make_tensor_proto(value).ByteSize()
        else:
            shares[key] = len(rest.dumps({key: rest._to_json(value)})) - len(json.dumps(key)) - 3
    return shares


def measure(name: str, work: Path, rounds: int) -> list[dict]:
    import gbp_rewrite
    from grpc_stand_in import StandIn
    from gbp_rewrite.serving import Client
    from gbp_rewrite.serving.request import make_inputs

    export = work / f"{name}_explainable"
    gbp_rewrite.convert(build_source(name, work), export, overwrite=True, image_bytes=True,
                        saliency_map_dtype="uint8", saliency_png=True)
    image = jpeg_224()
    image_file = work / "image.jpg"
    image_file.write_bytes(image)
    pixels = make_inputs(export, [str(image_file)], signature="serving_default")
    rows = []
    with StandIn(export, model_name=name) as server:
        cases = [
            ("float-JSON", Client(server.rest_address, model_name=name), lambda c: c.predict(pixels)),
            ("b64-JSON", Client(server.rest_address, model_name=name), lambda c: c.explain_images([image])),
            ("gRPC", Client(server.grpc_address, model_name=name, protocol="grpc"),
             lambda c: c.explain_images([image])),
            ("gRPC, PNG only", Client(server.grpc_address, model_name=name, protocol="grpc"),
             lambda c: c.explain_images([image], outputs=COMPACT)),
        ]
        for label, client, call in cases:  # the label's first word names the protocol
            milliseconds = timed(lambda: call(client), rounds)
            outputs = call(client)
            rows.append({"model": name, "route": label, "request_bytes": client.last_request_bytes,
                         "response_bytes": client.last_response_bytes, "ms": milliseconds,
                         **output_shares(outputs, "grpc" if label.startswith("gRPC") else "rest")})
            client.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="shapes_cnn,resnet50")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gbp_serving_table_") as work:
        for name in args.models.split(","):
            rows.extend(measure(name, Path(work), args.rounds))
    print("| model | route | request bytes | response bytes | of which saliency (float32) | saliency_map (uint8) "
          "| saliency_png_bytes | ms per image |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['route']} | {r['request_bytes']:,} | {r['response_bytes']:,} | "
              f"{r['saliency']:,} | {r['saliency_map']:,} | {r['saliency_png_bytes']:,} | {r['ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
