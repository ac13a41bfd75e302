"""Talking to a model server: `Client` (REST or gRPC) and TF Serving's gRPC messages.

    from gbp_rewrite.serving import Client
    with Client("localhost:8500", model_name="shapes", protocol="grpc") as client:
        outputs = client.explain_images(["cat.jpg"])   # serving_bytes: {output: array}

gRPC needs the optional extra `serving` (tensorflow-serving-api): pip install -e '.[serving]'.
"""

from gbp_rewrite.serving.client import PROTOCOLS, Client

__all__ = ["Client", "PROTOCOLS"]
