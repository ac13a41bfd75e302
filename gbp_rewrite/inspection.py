"""`inspect`: what a model offers to explain - its signatures and ReLU-family sites by layer."""

from __future__ import annotations

import collections
import dataclasses
import os

from gbp_rewrite import savedmodel, security, sites


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
                    "inputs": {k: d.describe() for k, d in sig.inputs.items()},
                    "outputs": {k: d.describe() for k, d in sig.outputs.items()},
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
    from gbp_rewrite import keras_loading

    if keras_loading.is_keras_source(path):
        from gbp_rewrite import keras_path  # imported here: it needs Keras, SavedModels do not

        return keras_path.inspect(path, signature=signature, safe_mode=safe_mode)
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
