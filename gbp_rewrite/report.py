"""The conversion report: what was found, what was done to it, and how the result checked out."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterable

from gbp_rewrite._version import __version__
from gbp_rewrite.conventions import REPORT_JSON

REPORT_TEXT = "gbp_rewrite_report.txt"


@dataclasses.dataclass
class SiteEntry:
    layer: str  # the layer's own name, e.g. "conv1"
    path: str  # enclosing models and layers, e.g. "model/block/conv1"
    op_name: str
    op_type: str
    status: str
    function: str = ""
    # The gradient the op got: 'guided' (or the rule's name), 'guided (smooth extension)' (the
    # extension, at the activation's output op), 'pass-through', or 'true gradient'.
    gradient: str = ""
    activation: str = ""  # what the op computes, as a user names it (sites.Site.kind)

    @classmethod
    def from_site(cls, site, status: str, gradient: str = "") -> "SiteEntry":
        """The entry of a sites.Site whose fate is `status` ('rewritten', 'off the explained path',
        'kept: why') and whose op got the rule `gradient` (selection.Selection.gradient)."""
        return cls(layer=site.layer, path=site.layer_path, op_name=site.node, op_type=site.op_type,
                   status=status, function=site.function, gradient=gradient, activation=site.kind)

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"


@dataclasses.dataclass
class ConversionReport:
    """Everything a reader needs to trust (or question) an explainable export."""

    tool_version: str
    source: str
    source_format: str
    destination: str
    signature: str
    rule: str
    rule_description: str
    score: str
    explained_output: str
    score_note: str
    inputs: list[str]
    saliency_outputs: dict[str, str]
    signatures: dict[str, list[str]]
    sites: list[SiteEntry]
    checks: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    saliency_maps: dict[str, str] = dataclasses.field(default_factory=dict)  # map key -> saliency key
    score_plan: str = ""  # e.g. "softmax logit", "binary sigmoid logit" (explainable.ScorePlan.name)
    serving: dict[str, Any] = dataclasses.field(default_factory=dict)  # serving.serving_signatures.ServingOptions.to_dict()

    @classmethod
    def build(
        cls, *, source: str, source_format: str, destination: Path, plan, rule, score: str,
        score_note: str, score_plan: str = "", signatures: dict[str, list[str]], sites: list[SiteEntry],
        checks: dict[str, str], warnings: Iterable[str] = (), started: float,
        serving: dict[str, Any] | None = None,
    ) -> "ConversionReport":
        """The report of a finished conversion (both paths); `plan` is the ExplainPlan written,
        `rule` the gradient rule applied, `started` the time.perf_counter() the conversion began."""
        return cls(
            tool_version=__version__, source=source, source_format=source_format,
            destination=str(destination), signature=plan.signature_key, rule=rule.name,
            rule_description=rule.description, score=score, explained_output=plan.output_key,
            score_note=score_note, score_plan=score_plan, inputs=[d.describe() for d in plan.inputs.values()],
            saliency_outputs=dict(plan.saliency_outputs), saliency_maps=dict(plan.saliency_maps),
            signatures=signatures, sites=sites, checks=checks, warnings=list(warnings),
            seconds=time.perf_counter() - started, serving=dict(serving or {}),
        )

    def _serving_lines(self) -> list[str]:
        lines = []
        if self.serving.get("image_bytes_signatures"):
            lines.append(f"  image bytes   : {', '.join(self.serving['image_bytes_signatures'])} take "
                         f"{self.serving['image_bytes_input']} (encoded images), preprocess "
                         f"{self.serving['preprocess']} ({self.serving['preprocess_formula']})")
        if self.serving.get("saliency_map_dtype", "float32") != "float32":
            lines.append(f"  map dtype     : saliency_map is {self.serving['saliency_map_dtype']} (0..255)")
        if self.serving.get("saliency_png"):
            lines.append("  saliency png  : the heat map of each example as a PNG (inferno)")
        return lines

    def write(self, export_dir: Path) -> None:
        """Save the report inside an export, under assets/ (JSON and text)."""
        assets = Path(export_dir) / "assets"
        assets.mkdir(exist_ok=True)
        (assets / REPORT_JSON).write_text(self.to_json() + "\n", encoding="utf-8")
        (assets / REPORT_TEXT).write_text(self.to_text() + "\n", encoding="utf-8")

    @property
    def rewritten(self) -> list[SiteEntry]:
        return [s for s in self.sites if s.rewritten]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_text(self) -> str:
        lines = [
            f"gbp_rewrite {self.tool_version}: {self.source} -> {self.destination}",
            f"  source format : {self.source_format}",
            f"  signature     : {self.signature} (inputs: {'; '.join(self.inputs)})",
            f"  rule          : {self.rule} - {self.rule_description}",
            f"  score         : {self.score} of the top class of output '{self.explained_output}' "
            f"({self.score_note})",
            *([f"  score plan    : {self.score_plan}"] if self.score_plan else []),
            "  saliency      : "
            + ", ".join(f"{out} = d(score)/d({inp})" for out, inp in self.saliency_outputs.items()),
            *(f"  saliency map  : {key} = max |{saliency}| over channels, scaled per example to [0, 1]"
              for key, saliency in self.saliency_maps.items()),
            *self._serving_lines(),
            f"  ReLU-family sites: {len(self.sites)} found, {len(self.rewritten)} rewritten",
        ]
        width = max([len(s.path) for s in self.sites] + [5])  # the layer path, as inspect names it
        for site in self.sites:
            gradient = f"  [{site.gradient}]" if site.gradient else ""
            lines.append(f"    {site.path:<{width}}  {site.op_type:<9}  {site.status:<28}  {site.op_name}{gradient}")
        lines.append("  exported signatures:")
        for key, outputs in self.signatures.items():
            lines.append(f"    {key}: {', '.join(outputs)}")
        if self.checks:
            lines.append("  self-check:")
            lines.extend(f"    {name}: {result}" for name, result in self.checks.items())
        lines.extend(f"  warning: {w}" for w in self.warnings)
        lines.append(f"  done in {self.seconds:.1f} s")
        return "\n".join(lines)
