"""Select the sites to rewrite: all, or those of the named layers, minus the excluded.

The ReLU-family sites always; with `smooth_activations='guided'` (the guided extension, guided rule
only) also the smooth activations (swish, GELU, mish, ELU, SELU, softplus, sigmoid, tanh,
hard_sigmoid, hard_silu), except a Softmax/Sigmoid that ends the explained output.

Both front ends select this way, over the sites they found (gbp_rewrite.graph.sites.Site, named
as the user knows the layers), so `--layers` and `--exclude_layers` mean the same everywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
from typing import Iterable, Sequence

from gbp_rewrite import rules
from gbp_rewrite.conventions import some_names
from gbp_rewrite.errors import SelectionError
from gbp_rewrite.graph.sites import Site


OFF_PATH = "off the explained path"
# An output Softmax/Sigmoid whose gradient passes straight through (the score is its logit).
PASSED_THROUGH = "passed through: the score is the logit before it"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The outcome of a layer selection: every site, and the ones to rewrite with why."""

    sites: tuple[Site, ...]
    selected: frozenset[tuple[str, str]]
    excluded: frozenset[tuple[str, str]]
    rule: str = "guided"
    # The selected smooth activations (the guided extension), a subset of `selected`.
    smooth: frozenset[tuple[str, str]] = frozenset()
    # With the extension: every smooth activation it could rewrite (smooth_candidates), and the
    # explained output's own Softmax/Sigmoid it leaves alone.
    smooth_candidates: frozenset[tuple[str, str]] = frozenset()
    output_ends: frozenset[tuple[str, str]] = frozenset()

    def status(self, site: Site, *, reached: bool = True, passed_through: bool = False) -> str:
        """What happened to the site's gradient: 'rewritten', 'off the explained path' (selected,
        but the explained score's gradient never runs through it, as recorded while tracing),
        PASSED_THROUGH (the output Softmax/Sigmoid of a logit score) or 'kept: <reason>'."""
        if passed_through:
            return PASSED_THROUGH
        if site.key in self.selected:
            return "rewritten" if reached else OFF_PATH
        if site.key in self.smooth_candidates:
            return "kept: excluded" if site.key in self.excluded else "kept: not selected"
        if site.key in self.output_ends:
            return f"kept: the explained output's {site.op_type}, not a hidden activation"
        if site.activation:
            return f"kept: part of {site.activation}, not a ReLU activation"
        if not site.rewritable:
            return f"kept: no guided rule for {site.op_type}"
        if site.key in self.excluded:
            return "kept: excluded"
        return "kept: not selected"

    def gradient(self, site: Site, status: str) -> str:
        """Which gradient rule the site's op got, as the report names it: the rule's name,
        rules.SMOOTH_RULE_LABEL, 'pass-through' or 'true gradient'."""
        if status == PASSED_THROUGH:
            return "pass-through"
        if status != "rewritten":
            return "true gradient"
        return rules.SMOOTH_RULE_LABEL if site.key in self.smooth else self.rule

    @property
    def selected_sites(self) -> list[Site]:
        return [s for s in self.sites if s.key in self.selected]


def layers_with_relu(sites: Iterable[Site]) -> list[str]:
    """Names of the layers that hold a rewritable ReLU, in graph order, once each."""
    return list(dict.fromkeys(s.layer_path for s in sites if s.rewritable))


def smooth_candidates(sites: Iterable[Site], *, output_ends: Iterable[tuple[str, str]] = ()) -> list[Site]:
    """The smooth activations the guided extension can rewrite: not the explained output's own
    Softmax/Sigmoid (`output_ends`: keys of the ops ending it), which keeps its pass-through or
    true gradient."""
    ends = set(output_ends)
    return [s for s in sites if s.smooth and s.key not in ends and s.output_key not in ends]


def activation_summary(sites: Iterable[Site]) -> str:
    """'Relu x3, Sigmoid x1, hard_silu x1' (op types, or the activation a ReLU op is part of, by
    count), or 'none'."""
    counts = collections.Counter(s.kind for s in sites)
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) or "none"


def path_suffixes(path: Sequence[str]) -> list[str]:
    """Every tail of a layer path, longest first: ('m', 'b', 'c') -> ['m/b/c', 'b/c', 'c']."""
    return ["/".join(path[i:]) for i in range(len(path))]


def _matches(site: Site, pattern: str) -> bool:
    """A name or glob matches the full layer path or any tail of it (`block_1*`,
    `mobilenetv2_1.00_96/block_1*`), an enclosing layer or model by name, or the op's name."""
    candidates = (*path_suffixes(site.path), *site.path, site.node)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def _some(names: Sequence[str]) -> str:
    """At most ten names, then 'and N more (see inspect)'."""
    return some_names(names)


def select(
    sites: Sequence[Site],
    *,
    layers: Sequence[str] | None = None,
    exclude_layers: Sequence[str] | None = None,
    rule: str = "guided",
    smooth_activations: str = rules.SMOOTH_TRUE,
    output_ends: Iterable[tuple[str, str]] = (),
) -> Selection:
    """Select the ReLU sites to rewrite: all, or those of the named layers, minus the excluded.

    With `smooth_activations` 'guided' (rules.check_smooth_activations: guided rule only), the
    smooth activations (smooth_candidates; `output_ends`: the keys of the ops that end the
    explained output) are selected the same way, for the guided extension.

    A name or glob matches a site when it matches the full layer path or any tail of it (the
    layer's own name is the shortest), any enclosing layer (a nested model), or the op name. One
    that matches nothing is an error listing the layers that hold ReLUs, and so is a selection
    that rewrites nothing. A model without a ReLU is an error naming `--rule vanilla`, except for
    `rule` 'vanilla' (the plain gradient needs no ReLU), which then selects nothing.
    """
    rules.check_smooth_activations(smooth_activations, rule)
    output_ends = frozenset(output_ends)
    smooth = smooth_candidates(sites, output_ends=output_ends)
    rewritable = [s for s in sites if s.rewritable]
    if smooth_activations == rules.SMOOTH_GUIDED:
        rewritable += smooth
    if not rewritable and not (rule == rules.VANILLA and not patterns(layers)):
        found = activation_summary(sites)
        extension = (f", or --smooth_activations {rules.SMOOTH_GUIDED} for the guided extension to smooth "
                     "activations (dx = f'(x)*dy*[dy>0], not the published rule)"
                     if smooth and rule == "guided" and smooth_activations != rules.SMOOTH_GUIDED else "")
        raise SelectionError(
            f"the model has no ReLU or ReLU6 op to rewrite (activations found: {found}); the {rule} "
            f"rule only changes ReLU-family gradients; use --rule {rules.VANILLA} for the plain gradient"
            f"{extension}"
        )
    if not rewritable:
        return Selection(tuple(sites), frozenset(), frozenset(), rule)
    layers = patterns(layers)
    exclude_layers = patterns(exclude_layers)
    for option, given in (("--layers", layers), ("--exclude_layers", exclude_layers)):
        for pattern in given:
            if not any(_matches(s, pattern) for s in rewritable):
                what = "a ReLU or smooth activation" if smooth_activations == rules.SMOOTH_GUIDED else "a ReLU"
                raise SelectionError(
                    f"{option} {pattern!r} matches no layer holding {what}; layers with ReLUs: "
                    f"{_some(layers_with_relu(rewritable))}"
                    + (f"; with smooth activations: {_some(_layers_of(smooth))}"
                       if smooth_activations == rules.SMOOTH_GUIDED else "")
                )
    chosen = [s for s in rewritable if not layers or any(_matches(s, p) for p in layers)]
    excluded = {s.key for s in chosen if any(_matches(s, p) for p in exclude_layers)}
    selected = {s.key for s in chosen} - excluded
    if not selected:
        raise SelectionError(
            "the layer selection rewrites nothing: every selected ReLU is excluded by "
            f"--exclude_layers {','.join(exclude_layers)}"
        )
    extended = smooth_activations == rules.SMOOTH_GUIDED
    candidates = {s.key for s in smooth} if extended else set()
    ends = {s.key for s in sites if s.smooth} & set(output_ends) if extended else set()
    return Selection(tuple(sites), frozenset(selected), frozenset(excluded), rule,
                     frozenset(candidates & selected), frozenset(candidates), frozenset(ends))


def _layers_of(sites: Iterable[Site]) -> list[str]:
    return list(dict.fromkeys(s.layer_path for s in sites))


def patterns(value: Sequence[str] | str | None) -> list[str]:
    """A --layers/--exclude_layers value as a list of patterns: 'a, b*' or ['a', 'b*'] -> ['a', 'b*']."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [p.strip() for p in value if p and p.strip()]
