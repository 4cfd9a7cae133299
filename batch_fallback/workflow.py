"""Workflows: graphs of nodes in ComfyUI's API format, checked whole before they are queued, then run
in topological order as one job.

A graph maps node ids to `{"class_type": NAME, "inputs": {...}}`; an input is a literal (a widget's
value) or a link `[node_id, output_index]` to another node's output. Node classes (`nodes.py`) declare
their inputs and outputs once, as `Input`s and output types; validation, execution and ComfyUI's
`/object_info` all read those declarations.

Nothing is cached across jobs: every run starts from an empty table of values, so one user's
conditioning, latents or images can never reach another's job.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InvalidJob

MAX_NODES = 256
MAX_ID_LENGTH = 64


@dataclass(frozen=True)
class Catalog:
    """What a workflow may name on this server, for validation and for `/object_info`."""

    checkpoints: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    upscale_models: tuple[str, ...] = ()
    images: Callable[[], tuple[str, ...]] = lambda: ()
    """The uploaded images (LoadImage's choices)."""
    has_image: Callable[[str], bool] = lambda name: False
    max_width: int = 2048
    max_height: int = 2048


@dataclass(frozen=True)
class Input:
    """One input of a node class: a link of a socket type ("MODEL", "LATENT", …) or a widget."""

    name: str
    type: str
    default: Any = None
    minimum: float | None = None
    maximum: float | Callable[[Catalog], float] | None = None
    step: float | None = None
    options: tuple[str, ...] | Callable[[Catalog], Sequence[str]] = ()
    """A COMBO's choices (fixed, or what the server has)."""
    lookup: Callable[[Catalog, str], bool] | None = None
    """For a COMBO of files: whether a name exists (instead of membership in the listed choices)."""
    optional: bool = False
    multiline: bool = False
    tooltip: str = ""

    def choices(self, catalog: Catalog) -> tuple[str, ...]:
        return tuple(self.options(catalog) if callable(self.options) else self.options)

    def upper(self, catalog: Catalog) -> float | None:
        return self.maximum(catalog) if callable(self.maximum) else self.maximum

    def spec(self, catalog: Catalog) -> list[Any]:
        """As ComfyUI's `/object_info` lists an input: `[TYPE, {options}]`, a COMBO as `[[choices], {}]`."""
        options: dict[str, Any] = {}
        if self.default is not None:
            options["default"] = self.default
        for key, value in (("min", self.minimum), ("max", self.upper(catalog)), ("step", self.step)):
            if value is not None:
                options[key] = value
        if self.multiline:
            options["multiline"] = True
        if self.tooltip:
            options["tooltip"] = self.tooltip
        if self.type == "COMBO":
            return [list(self.choices(catalog)), options]
        return [self.type, options]

    def check(self, value: Any, catalog: Catalog) -> tuple[Any, dict[str, Any] | None]:
        """(the value as the node takes it, None) or (None, a ComfyUI-shaped error)."""
        if self.type == "COMBO":
            if isinstance(value, str) and self.lookup is not None:
                if self.lookup(catalog, _annotated(value)):
                    return _annotated(value), None
            elif isinstance(value, str) and value in self.choices(catalog):
                return value, None
            choices = self.choices(catalog)
            shown = ", ".join(repr(choice) for choice in choices[:20]) + (", …" if len(choices) > 20 else "")
            return None, _error("value_not_in_list", "Value not in list", f"{self.name}: {value!r} not in [{shown}]", self.name, value)
        if self.type == "INT":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    return None, _conversion(self, value)
        elif self.type == "FLOAT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return None, _conversion(self, value)
            value = float(value)
        elif self.type == "STRING":
            if not isinstance(value, str):
                return None, _conversion(self, value)
            if len(value) > 8000:
                return None, _error("value_bigger_than_max", "Value bigger than max", f"{self.name}: {len(value)} characters, at most 8000", self.name, value[:40])
        elif self.type == "BOOLEAN":
            if not isinstance(value, bool):
                return None, _conversion(self, value)
        else:
            return None, _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", f"{self.name}: {self.type} comes from another node, got {value!r}", self.name, value)
        upper = self.upper(catalog)
        if self.minimum is not None and value < self.minimum:
            return None, _error("value_smaller_than_min", f"Value {value} smaller than min of {self.minimum}", f"{self.name}", self.name, value)
        if upper is not None and value > upper:
            return None, _error("value_bigger_than_max", f"Value {value} bigger than max of {upper}", f"{self.name}", self.name, value)
        return value, None


class Node:
    """A node class. Subclasses set the class attributes and `run`, which gets the inputs by name and
    returns one value per output."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    category: ClassVar[str]
    description: ClassVar[str] = ""
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(type, name) of each output, in order."""
    output_node: ClassVar[bool] = False

    def run(self, context: Any, **values: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def extra_checks(self, values: Mapping[str, Any], catalog: Catalog) -> list[dict[str, Any]]:
        """Checks across inputs (e.g. a scheduler its sampler cannot use), as ComfyUI-shaped errors."""
        return []

    @classmethod
    def object_info(cls, catalog: Catalog) -> dict[str, Any]:
        required = {i.name: i.spec(catalog) for i in cls.inputs if not i.optional}
        optional = {i.name: i.spec(catalog) for i in cls.inputs if i.optional}
        return {
            "input": {"required": required, **({"optional": optional} if optional else {})},
            "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
            "output": [kind for kind, _ in cls.outputs],
            "output_is_list": [False for _ in cls.outputs],
            "output_name": [name for _, name in cls.outputs],
            "name": cls.name,
            "display_name": cls.display_name,
            "description": cls.description,
            "python_module": "nodes",
            "category": cls.category,
            "output_node": cls.output_node,
        }


class WorkflowInvalid(InvalidJob):
    """A workflow refused before it was queued. `error` and `node_errors` are the body ComfyUI's
    `POST /prompt` answers with; the message names the first node at fault."""

    def __init__(self, error_type: str, message: str, details: str = "", node_errors: dict[str, Any] | None = None) -> None:
        self.error = {"type": error_type, "message": message, "details": details, "extra_info": {}}
        self.node_errors = node_errors or {}
        first = next(iter(self.node_errors.items()), None)
        if first is not None:
            node_id, entry = first
            problem = entry["errors"][0]
            text = f"node {node_id} ({entry['class_type']}): {problem['message']}: {problem['details']}"
            field_name = f"params.prompt.{node_id}.inputs.{problem['extra_info'].get('input_name', '')}".rstrip(".")
        else:
            text = f"{message}{': ' + details if details else ''}"
            field_name = "params.prompt"
        super().__init__(f"workflow: {text}", field=field_name)


@dataclass(frozen=True)
class Link:
    node: str
    output: int


@dataclass(frozen=True)
class Step:
    """One node of a validated workflow: its class and its inputs (literals checked, links resolved)."""

    id: str
    node: Node
    inputs: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """A validated workflow: its nodes in the order they run, and the output nodes among them."""

    steps: tuple[Step, ...]
    outputs: tuple[str, ...]
    consumers: dict[str, int] = field(default_factory=dict)
    """How many inputs read each node's outputs (its values are freed after the last one)."""


def plan(graph: object, registry: Mapping[str, Node], catalog: Catalog) -> Plan:
    """Check a whole graph and order it; raises WorkflowInvalid naming what is wrong and where."""
    if not isinstance(graph, dict) or not graph:
        raise WorkflowInvalid(
            "invalid_prompt", "The prompt must be a non-empty object of nodes", "got an empty object" if graph == {} else f"got {type(graph).__name__}"
        )
    if len(graph) > MAX_NODES:
        raise WorkflowInvalid("invalid_prompt", f"A workflow has at most {MAX_NODES} nodes", f"got {len(graph)}")
    nodes: dict[str, Node] = {}
    for node_id, entry in graph.items():
        if len(node_id) > MAX_ID_LENGTH:
            raise WorkflowInvalid("invalid_prompt", f"Node ids are at most {MAX_ID_LENGTH} characters", f"Node ID '#{node_id[:MAX_ID_LENGTH]}…'")
        if not isinstance(entry, dict) or not isinstance(entry.get("class_type"), str):
            raise WorkflowInvalid("invalid_prompt", "Cannot execute because a node is missing the class_type property.", f"Node ID '#{node_id}'")
        if "inputs" in entry and not isinstance(entry["inputs"], dict):
            raise WorkflowInvalid("invalid_prompt", "A node's inputs must be an object", f"Node ID '#{node_id}'")
        node = registry.get(entry["class_type"])
        if node is None:
            raise WorkflowInvalid("invalid_prompt", f"Cannot execute because node {entry['class_type']} does not exist.", f"Node ID '#{node_id}'")
        nodes[node_id] = node
    outputs = [node_id for node_id, node in nodes.items() if node.output_node]
    if not outputs:
        raise WorkflowInvalid("prompt_no_outputs", "Prompt has no outputs", "add a SaveImage or PreviewImage node")

    errors: dict[str, list[dict[str, Any]]] = {}
    steps: dict[str, Step] = {}
    edges: dict[str, list[str]] = {node_id: [] for node_id in nodes}  # node → the nodes it reads
    consumers: dict[str, int] = dict.fromkeys(nodes, 0)
    for node_id, node in nodes.items():
        given = graph[node_id].get("inputs", {})
        resolved: dict[str, Any] = {}
        problems: list[dict[str, Any]] = []
        for declared in node.inputs:
            if declared.name not in given:
                if declared.optional:
                    continue
                problems.append(_error("required_input_missing", "Required input is missing", declared.name, declared.name))
                continue
            value = given[declared.name]
            if _is_link(value):
                link = Link(str(value[0]), int(value[1]))
                source = nodes.get(link.node)
                if source is None or not 0 <= link.output < len(source.outputs):
                    problems.append(_error("bad_linked_input", "Bad linked input", f"{declared.name}: no output {link.output} on node {link.node!r}", declared.name, value))
                    continue
                produced = source.outputs[link.output][0]
                if produced != declared.type:
                    problems.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            f"{declared.name}, received_type({produced}) mismatch input_type({declared.type})",
                            declared.name,
                            value,
                        )
                    )
                    continue
                resolved[declared.name] = link
                edges[node_id].append(link.node)
                consumers[link.node] += 1
                continue
            value, problem = declared.check(value, catalog)
            if problem is not None:
                problems.append(problem)
            else:
                resolved[declared.name] = value
        if not problems:
            problems = node.extra_checks({k: v for k, v in resolved.items() if not isinstance(v, Link)}, catalog)
        if problems:
            errors[node_id] = problems
        steps[node_id] = Step(node_id, node, resolved)

    for node_id, node in nodes.items():
        if not node.output_node and consumers[node_id] == 0 and node_id not in errors:
            errors[node_id] = [
                _error("output_not_consumed", "No node reads this node's outputs", f"{node.name} {node_id!r} is not linked to any output node; remove it or link it", "")
            ]
    order, cycle = _topological(edges)
    if cycle:  # told with the other faults, so that one round of fixes can mend them all
        errors.setdefault(cycle[0], []).append(
            _error("dependency_cycle", "Dependency cycle detected", f"nodes {', '.join(cycle)} depend on each other", "")
        )
    if errors:
        raise WorkflowInvalid(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            node_errors={
                node_id: {"errors": problems, "dependent_outputs": _dependent_outputs(node_id, edges, outputs), "class_type": nodes[node_id].name}
                for node_id, problems in sorted(errors.items(), key=lambda item: _order_key(item[0]))
            },
        )
    return Plan(tuple(steps[node_id] for node_id in order), tuple(node_id for node_id in order if nodes[node_id].output_node), consumers)


def execute(workflow: Plan, context: Any, on_node: Callable[[str, tuple[str, ...]], None]) -> None:
    """Run every node in order. `on_node(node_id, done)` is called before each node (it may raise to
    stop there); a node's values are dropped once every input that reads them has."""
    values: dict[str, tuple[Any, ...]] = {}
    remaining = dict(workflow.consumers)
    done: list[str] = []
    for step in workflow.steps:
        on_node(step.id, tuple(done))
        arguments = {}
        for name, value in step.inputs.items():
            if isinstance(value, Link):
                arguments[name] = values[value.node][value.output]
                remaining[value.node] -= 1
                if remaining[value.node] == 0:
                    del values[value.node]
            else:
                arguments[name] = value
        context.node_id = step.id
        produced = step.node.run(context, **arguments)
        if len(produced) != len(step.node.outputs):
            raise AssertionError(f"{step.node.name} returned {len(produced)} values for {len(step.node.outputs)} outputs")
        if remaining[step.id]:
            values[step.id] = produced
        done.append(step.id)


def _topological(edges: Mapping[str, list[str]]) -> tuple[list[str], list[str]]:
    """Kahn's order (ties by node id, numerically where ids are numbers), and the nodes of the cycles
    that stop it there (none when there is none)."""
    waiting = {node_id: len(set(reads)) for node_id, reads in edges.items()}
    readers: dict[str, list[str]] = {node_id: [] for node_id in edges}
    for node_id, reads in edges.items():
        for source in set(reads):
            readers[source].append(node_id)
    ready = [(_order_key(node_id), node_id) for node_id, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, node_id = heapq.heappop(ready)
        order.append(node_id)
        for reader in readers[node_id]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, (_order_key(reader), reader))
    if len(order) < len(edges):
        stuck = {node_id for node_id, count in waiting.items() if count}
        # What is left also holds the nodes downstream of a cycle: peel off those nothing left reads.
        while True:
            read = {source for node_id in stuck for source in edges[node_id] if source in stuck}
            if read >= stuck:
                break
            stuck &= read
        return order, sorted(stuck, key=_order_key)
    return order, []


def _dependent_outputs(node_id: str, edges: Mapping[str, list[str]], outputs: Sequence[str]) -> list[str]:
    """The output nodes that read this node, directly or not."""
    found = []
    for output in outputs:
        seen, stack = set(), [output]
        while stack:
            current = stack.pop()
            if current == node_id:
                found.append(output)
                break
            if current not in seen:
                seen.add(current)
                stack.extend(edges.get(current, ()))
    return found


def _order_key(node_id: str) -> tuple[int, float, str]:
    return (0, float(node_id), node_id) if node_id.isdigit() else (1, 0.0, node_id)


def _is_link(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _annotated(name: str) -> str:
    """ComfyUI lets an image name carry its folder as `name.png [input]`."""
    return name[: -len(" [input]")] if name.endswith(" [input]") else name


def _conversion(declared: Input, value: object) -> dict[str, Any]:
    return _error(
        "invalid_input_type",
        f"Failed to convert an input value to a {declared.type} value",
        f"{declared.name}, {value!r}",
        declared.name,
        value,
    )


def _error(kind: str, message: str, details: str, input_name: str, value: object = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"input_name": input_name}
    if value is not None:
        # NaN and the infinities (which JSON parsers here accept) are given as text: JSON cannot carry them.
        plain = isinstance(value, (int, str, bool)) or (isinstance(value, float) and math.isfinite(value))
        extra["received_value"] = value if plain else repr(value)[:200]
    return {"type": kind, "message": message, "details": details, "extra_info": extra}
