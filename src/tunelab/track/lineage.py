"""The lineage of a run: dataset → training run → adapter → merged model → export/serve/eval.

Upstream, the chain follows each run's primary input (its first) to the run that produced it,
up to an artifact nothing produced (a dataset, a base model). Downstream, every run that read
one of the run's outputs is shown, recursively. Runs above the chosen one show only the branch
that leads to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.track.registry import Registry, TrackError


@dataclass
class Node:
    """One line of the lineage tree: a run or an artifact."""

    kind: str
    label: str
    run_id: str | None = None
    focus: bool = False
    children: list[Node] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The tree as nested dicts."""
        return {"kind": self.kind, "label": self.label, "run_id": self.run_id, "focus": self.focus,
                "children": [c.to_dict() for c in self.children]}

    def walk(self) -> list[Node]:
        """This node and all below it, depth first."""
        return [self, *(n for c in self.children for n in c.walk())]


def run_summary(info: dict[str, Any]) -> str:
    """A short description of a run for one line: where it is and its headline numbers."""
    parts = [info.get("path") or ""]
    metrics = {k: v for k, v in (info.get("metrics") or {}).items() if isinstance(v, int | float)}
    if info["kind"] == "train":
        parts.append(f"{info.get('method', '')} {info.get('objective', '')}, {info.get('steps', '?')} steps")
    if info["kind"] == "serve":
        parts.append(f"{info.get('status')}, model name {(info.get('config') or {}).get('name', '')}")
    parts += [f"{k} {v:.4g}" for k, v in list(metrics.items())[:3]]
    others = [f"{i['kind']} {i['path']}" for i in (info.get("inputs") or [])[1:] if i["kind"] != "dataset"]
    if others:
        parts.append("with " + ", ".join(others))
    return "; ".join(p for p in parts if p.strip())


def _producer(registry: Registry, artifact: dict[str, Any]) -> dict[str, Any] | None:
    if artifact.get("run_id"):
        try:
            return registry.get(artifact["run_id"])
        except TrackError:
            pass
    return registry.producer_of(artifact["path"])


def _artifact_label(artifact: dict[str, Any]) -> str:
    if artifact["kind"] == "dataset" and artifact.get("fingerprint"):
        return f"{artifact['path']} (fingerprint {artifact['fingerprint'][:12]})"
    return artifact["path"]


def _run_node(registry: Registry, info: dict[str, Any], focus_id: str, path_ids: list[str], below_focus: bool,
              seen: set[str]) -> Node:
    seen.add(info["run_id"])
    focus = info["run_id"] == focus_id
    node = Node(info["kind"], f"{info['run_id']}  {run_summary(info)}", info["run_id"], focus)
    below = below_focus or focus
    for output in info.get("outputs") or []:
        child = Node(output["kind"], _artifact_label(output))
        for consumer in registry.consumers_of(output["path"]):
            if consumer["run_id"] in seen or consumer["started_at"] < info["started_at"]:
                continue  # already shown, or it read an older artifact at the same path
            if below or consumer["run_id"] in path_ids:
                child.children.append(_run_node(registry, consumer, focus_id, path_ids, below, seen))
        if below or child.children:
            node.children.append(child)
    return node


def lineage_tree(registry: Registry, ref: str) -> Node:
    """The lineage tree around run ``ref`` (id or unique prefix), rooted at its first ancestor's input.

    Raises:
        TrackError: unknown run.
    """
    run = registry.get(ref)
    chain = [run]
    while chain[0].get("inputs"):
        producer = _producer(registry, chain[0]["inputs"][0])
        if producer is None or producer["run_id"] in {c["run_id"] for c in chain}:
            break
        chain.insert(0, producer)
    path_ids = [c["run_id"] for c in chain]
    top = _run_node(registry, chain[0], run["run_id"], path_ids, False, set())
    first_input = (chain[0].get("inputs") or [None])[0]
    if first_input is None:
        return top
    return Node(first_input["kind"], _artifact_label(first_input), children=[top])


def render_tree(root: Node) -> str:
    """The tree as indented text lines; the chosen run is marked with ``<-``."""
    lines = [f"{root.kind} {root.label}"]

    def add(node: Node, prefix: str) -> None:
        for index, child in enumerate(node.children):
            last = index == len(node.children) - 1
            mark = "  <-" if child.focus else ""
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{child.kind} {child.label}{mark}")
            add(child, prefix + ("   " if last else "│  "))

    add(root, "")
    return "\n".join(lines)
