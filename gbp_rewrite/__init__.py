"""gbp_rewrite: serve TensorFlow models that explain themselves with guided backpropagation.

    import gbp_rewrite
    print(gbp_rewrite.inspect("models/resnet").to_text())   # signatures, ReLU sites by layer
    report = gbp_rewrite.convert("models/resnet", "models/resnet_explainable", rule="guided")
    print(report.to_text())

The export's serving signature returns the original outputs plus `saliency` and `explained_class`;
it loads anywhere TensorFlow does (TF Serving, C++, plain Python) without this package.

Attributes are imported lazily, so `import gbp_rewrite.cli` can configure TensorFlow's logging
before TensorFlow is loaded.
"""

import importlib

from gbp_rewrite._version import __version__

_LAZY = {
    "convert": ("gbp_rewrite.pipeline", "convert"),
    "inspect": ("gbp_rewrite.inspection", "inspect"),
    "guided_model": ("gbp_rewrite.keras.front_end", "guided_model"),
    "explain": ("gbp_rewrite.pictures.explainer", "explain"),
    "sanity": ("gbp_rewrite.sanity_checks.run", "sanity"),
    "verify_export": ("gbp_rewrite.deploy.check", "verify_export"),
    "make_request": ("gbp_rewrite.serving.request", "make_request"),
    "decode_response": ("gbp_rewrite.serving.rest", "decode_response"),
    "GbpError": ("gbp_rewrite.errors", "GbpError"),
    "ConversionReport": ("gbp_rewrite.report", "ConversionReport"),
    "RULES": ("gbp_rewrite.rules", "RULES"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'gbp_rewrite' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
