"""Walking GraphDefs and FunctionDefs: tensor references, ancestors, called functions.

Shared by the modules that read a SavedModel's graph (sites, security, folded_twin, fold_batchnorm,
tf1_variables); it imports nothing from gbp_rewrite, so any of them can use it.
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator, Mapping


def node_of(ref: str) -> str:
    """'^node' (control input), 'node:0' (graph) or 'node:out:0' (function body) -> 'node'."""
    return ref.lstrip("^").split(":")[0]


def func_refs(node) -> Iterator:
    """The function references (NameAttrList messages) in a NodeDef's attrs: a call's `f`, a
    control-flow op's branches and bodies, a dataset's functions. Reading `.name` gives the called
    function; setting it redirects the call."""
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func
        elif value.HasField("list"):
            yield from value.list.func


def ancestors(roots: Iterable[str], nodes_by_name: Mapping[str, object]) -> set[str]:
    """Names of the nodes the tensor references `roots` depend on, control inputs included
    (the nodes themselves too); references to unknown nodes are ignored."""
    seen: set[str] = set()
    stack = [node_of(ref) for ref in roots]
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes_by_name:
            continue
        seen.add(name)
        stack.extend(node_of(ref) for ref in nodes_by_name[name].input)
    return seen


def reachable_functions(by_name: Mapping[str, object], roots: Iterable[str]) -> list[str]:
    """The functions named in `roots` and every library function they call, transitively, in
    breadth-first discovery order; `by_name` maps function names to FunctionDefs, and names it
    lacks (calls of missing functions) are left out."""
    found: list[str] = []
    seen: set[str] = set()
    pending = collections.deque(roots)
    while pending:
        name = pending.popleft()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        found.append(name)
        for node in by_name[name].node_def:
            pending.extend(ref.name for ref in func_refs(node))
    return found
