"""`inspect`: what a model offers to explain - its signatures and ReLU-family sites by layer."""

from __future__ import annotations

import collections
import dataclasses
import os

from typing import Mapping

from gbp_rewrite import security
from gbp_rewrite.graph import savedmodel, sites
from gbp_rewrite.graph.savedmodel import SignatureDesc
from gbp_rewrite.keras import loading as keras_loading
from gbp_rewrite.keras import signature as keras_signature
from gbp_rewrite.keras import sites as keras_sites


@dataclasses.dataclass
class ModelInfo:
    path: str
    format: str
    tags: list[str]
    signatures: dict[str, savedmodel.SignatureDesc]
    signature: str | None  # the signature whose sites are listed
    sites: list[sites.Site]
    # Ops that reach files or the network outside the standard savers (gbp_rewrite.security).
    file_ops: list[security.FileOp] = dataclasses.field(default_factory=list)

    def layers(self) -> dict[str, list[sites.Site]]:
        """Sites grouped by layer path, in graph order."""
        grouped: dict[str, list[sites.Site]] = collections.OrderedDict()
        for site in self.sites:
            grouped.setdefault(site.layer_path, []).append(site)
        return grouped

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "tags": self.tags,
            "signatures": {
                key: {
                    "inputs": {k: _tensor_dict(d) for k, d in sig.inputs.items()},
                    "outputs": {k: _tensor_dict(d) for k, d in sig.outputs.items()},
                }
                for key, sig in self.signatures.items()
            },
            "signature": self.signature,
            "sites": [
                {"layer": s.layer_path, "op_name": s.node, "op_type": s.op_type, "function": s.function,
                 **({"activation": s.activation, "rewritable": False} if s.activation else {})}
                for s in self.sites
            ],
            "file_ops": [op.to_dict() for op in self.file_ops],
        }

    def to_text(self) -> str:
        lines = [f"{self.path}: {self.format} SavedModel, tags {','.join(self.tags) or '(none)'}"]
        for key, sig in self.signatures.items():
            lines.append(f"  signature {key}")
            lines.extend(f"    input  {d.describe()}" for d in sig.inputs.values())
            lines.extend(f"    output {d.describe()}" for d in sig.outputs.values())
        if self.file_ops:
            lines.append(f"  file-system and network ops outside the standard savers: {len(self.file_ops)} "
                         "(convert refuses the model unless --allow_file_ops)")
            lines.extend(f"    {op.describe()}" for op in self.file_ops)
        if self.signature is None:
            return "\n".join(lines)
        rewritable = sum(s.rewritable for s in self.sites)
        lines.append(
            f"  ReLU-family sites of {self.signature}: {len(self.sites)} "
            f"({rewritable} ReLU/ReLU6 that a rule can rewrite)"
        )
        for layer, layer_sites in self.layers().items():
            ops = ", ".join(f"{s.op_type} {s.node}" + (f" (part of {s.activation}: kept)" if s.activation else "")
                            for s in layer_sites)
            lines.append(f"    {layer}: {ops}")
        return "\n".join(lines)


def inspect(path: str | os.PathLike, *, signature: str | None = None, safe_mode: bool = True) -> ModelInfo:
    """Describe the model at `path`: signatures, inputs, outputs, and ReLU sites of `signature`.

    `signature` defaults to 'serving_default' when the model has it, else the first signature.
    A .keras/.h5 file (or a keras.Model) is described as `model.export` would serve it; loading it
    is safe unless `safe_mode=False` (which lets a Lambda layer's Python code run).
    """
    if keras_loading.is_keras_source(path):
        return inspect_keras(path, signature=signature, safe_mode=safe_mode)
    model = savedmodel.read(path)
    keys = model.signature_keys()
    signatures = {key: model.signature(key) for key in keys}
    if signature is None:
        signature = "serving_default" if "serving_default" in keys else (keys[0] if keys else None)
    found: list[sites.Site] = []
    if signature is not None:
        desc = signatures.get(signature) or model.signature(signature)  # an unknown key raises
        found = sites.find_sites(model.meta_graph, [d.tensor_name for d in desc.outputs.values()])
    return ModelInfo(str(path), model.format, model.tags, signatures, signature, found,
                     file_ops=security.find_file_ops(model.meta_graph))


class KerasModelInfo(ModelInfo):
    """`inspect` of a Keras model: its serving signature and sites, with what the Keras path can do."""

    def __init__(self, *args, kept: Mapping[tuple[str, str], str], **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = dict(kept)  # site key -> why the Keras path cannot rewrite it

    def to_dict(self) -> dict:
        data = super().to_dict()
        for entry, site in zip(data["sites"], self.sites):
            if site.key in self.kept:
                entry["keras_path"] = f"kept: {self.kept[site.key]}"
        return data

    def to_text(self) -> str:
        lines = super().to_text().splitlines()
        lines[0] = f"{self.path}: Keras model ({self.format}), as model.export would serve it"
        text = "\n".join(lines)
        if self.kept:
            text += (f"\n  {len(self.kept)} ReLU op(s) are computed where the Keras path cannot rewrite "
                     "them: " + "; ".join(sorted(set(self.kept.values())))
                     + "\n  (model.export(DIR), then convert DIR, rewrites every ReLU op)")
        return text


def inspect_keras(source, *, signature: str | None = None, safe_mode: bool = True) -> KerasModelInfo:
    """Describe a Keras model (in memory or a .keras/.h5 file): inputs, outputs, ReLU sites by layer."""
    if signature is not None:
        keras_signature.check_signature_key(signature)
    loaded = keras_loading.load(source, safe_mode=safe_mode)
    signature_desc = keras_signature.describe(loaded.model)
    found = keras_sites.find_sites(loaded.model, signature_desc)
    key = keras_signature.SIGNATURE_KEY
    return KerasModelInfo(
        loaded.description, loaded.format, [],
        {key: SignatureDesc(key, signature_desc.inputs, signature_desc.outputs)},
        key, [s.site for s in found],
        kept={s.site.key: s.reason for s in found if s.site.rewritable and not s.rewritable},
    )


def _tensor_dict(desc) -> dict:
    """A signature tensor for JSON: dtype and shape as separate fields, the shape a list with null
    for an unknown dimension (null altogether for an unknown rank); a composite (ragged, sparse)
    tensor has dtype null."""
    return {
        "dtype": desc.dtype.name if desc.dtype is not None else None,
        "shape": list(desc.shape) if desc.shape is not None else None,
        "tensor": desc.tensor_name,
    }
