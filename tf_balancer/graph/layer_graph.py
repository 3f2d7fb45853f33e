"""The layer graph: layers, producer -> consumer edges, and channel groups.

A **channel group** is a set of channels that must be pruned together: the
output channels of one or more producers (Conv/Dense) plus everything that
carries them (BatchNorm, activations, depthwise convs, pooling) up to the input
side of the consumers. Residual ``Add``-like merges join the groups of their
inputs; ``Concatenate`` lays groups side by side (each at an offset); ``Flatten``
repeats a group's channels once per spatial position for the following Dense.
A recurrent layer's units are one group across its gates (a ``Bidirectional``
output holds them once per direction); a ``MultiHeadAttention`` layer's heads
are a group of their own (``LayerNode.inner_layout``), while the widths it reads
and writes are not pruned.

A group is **prunable** only if every layer touching it is understood, it does
not reach a model output or come from a model input. Otherwise it carries the
reasons, e.g. ``"consumed by 'reshape' (Reshape), which tf_balancer does not
understand"`` - analysis never crashes on an unknown layer.

Example:
    >>> from tf_balancer._compat import keras
    >>> inp = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, name="a")(inp)
    >>> y = keras.layers.Conv2D(4, 1, name="b")(x)
    >>> x = keras.layers.Add(name="add")([x, y])
    >>> out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    >>> graph = LayerGraph.from_model(keras.Model(inp, out))
    >>> graph.group_of("a") == graph.group_of("b")
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from tf_balancer.errors import UnsupportedModelError
from tf_balancer.graph.layer_specs import (
    LayerSpec,
    couples_channels,
    spec_for,
    why_opaque,
    width_of,
)
from tf_balancer.graph.walk import Call, Walk, walk_model
from tf_balancer.input_shapes import has_open_axes, open_axes_message

__all__ = ["Segment", "Layout", "Member", "ChannelGroup", "LayerNode", "LayerGraph"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """``size`` consecutive channels of group ``group`` along the last axis."""

    group: int
    size: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which group each channel of a tensor belongs to.

    ``spatial > 1`` for a flattened tensor: feature ``s * width + offset + c``
    is channel ``c`` of the segment at ``offset``, for each position ``s``.
    """

    segments: tuple[Segment, ...]
    spatial: int = 1

    @property
    def width(self) -> int:
        return sum(s.size for s in self.segments)

    def with_offsets(self) -> Iterator[tuple[Segment, int]]:
        offset = 0
        for segment in self.segments:
            yield segment, offset
            offset += segment.size


@dataclasses.dataclass(frozen=True)
class Member:
    """A layer's part in a group.

    ``role`` is ``producer`` (slice output channels), ``passthrough`` (slice
    per-channel weights) or ``consumer`` (slice input channels). ``offset``,
    ``width`` and ``spatial`` locate the group's channels in the member's
    input (consumer) or input/output (passthrough) channel axis.
    """

    node: str
    role: str
    offset: int = 0
    width: int = 0
    spatial: int = 1

    def indices(self, channels: Any) -> Any:
        """Feature indices, on this member's axis, of the given group channels."""
        import numpy as np

        channels = np.asarray(channels, dtype=np.int64)
        blocks = [s * self.width + self.offset + channels for s in range(self.spatial)]
        return np.concatenate(blocks) if blocks else channels


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together; see the module docstring."""

    id: int
    size: int
    members: tuple[Member, ...]
    reasons: tuple[str, ...] = ()
    unit: int = 1
    """Channels each element of the group stands for: 1, or an attention head's width."""
    blocks: int = 1
    """The group's channels are ``blocks`` equal consecutive runs, and a plan keeps as
    many channels of each: a grouped convolution reads or writes them (its groups,
    or a multiple of them when several grouped convolutions share the group)."""

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def nodes(self, role: str) -> list[str]:
        return [m.node for m in self.members if m.role == role]


@dataclasses.dataclass(frozen=True)
class LayerNode:
    """One layer call in the graph."""

    name: str
    class_name: str
    role: str
    layer: Any
    inputs: tuple[str, ...]
    input_shapes: tuple[tuple, ...]
    output_shape: tuple
    out_layout: Layout | None
    in_layouts: tuple[Layout | None, ...]
    inner_layout: Layout | None = None

    @property
    def channel_layout(self) -> Layout | None:
        """The channels the node's own (``out_axes``) weights index: its attention
        heads when it has them, else its output channels."""
        return self.inner_layout or self.out_layout


def _sharable(spec: LayerSpec) -> bool:
    """Roles a layer called several times keeps (its calls' channels are joined)."""
    return spec.role in ("producer", "passthrough", "reduce", "flatten", "merge", "concat")


def _frozen(call: Call) -> str | None:
    """Why a producer's channels stay: it is frozen (``trainable=False``, e.g. a
    transfer-learning backbone), so pruning would change weights nothing retrains."""
    if getattr(call.layer, "trainable", True):
        return None
    return f"{call.name!r} is frozen (trainable=False): its weights are kept as they are"


def _same_shape(a: Layout, b: Layout) -> bool:
    """Two layouts with segments of the same sizes, in the same order and spacing."""
    return (
        a.spatial == b.spatial
        and len(a.segments) == len(b.segments)
        and all(x.size == y.size for x, y in zip(a.segments, b.segments, strict=True))
    )


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _Builder:
    """Propagates channel layouts through the calls of a :class:`Walk`."""

    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.uf = _UnionFind()
        self.sizes: dict[int, int] = {}
        self.members: list[tuple[int, Member]] = []
        self.reasons: list[tuple[int, str]] = []
        self.layouts: dict[str, Layout | None] = {}
        self.producer_of: dict[str, str] = {}
        self.nodes: list[LayerNode] = []
        self.inner: dict[str, Layout] = {}
        self.units: dict[int, int] = {}
        self.blocks: list[tuple[int, int]] = []  # (group, conv groups it must split into)
        self.first_call: dict[int, tuple[Layout, Layout]] = {}  # shared layer -> (in, out)
        self.opaque_shared: set[int] = set()  # shared layers one of whose calls is opaque

    def new_group(self, size: int, reason: str | bool | None = None) -> Layout:
        gid = self.uf.new()
        self.sizes[gid] = size
        if reason:
            self.reasons.append((gid, reason))
        return Layout((Segment(gid, size),))

    def block(self, layout: Layout | None, reason: str) -> None:
        for segment in layout.segments if layout else ():
            self.reasons.append((segment.group, reason))

    def run(self) -> None:
        walk = self.walk
        for key in walk.input_keys:
            self.layouts[key] = self.new_group(_channels(walk.shapes[key]), "model input")
        for call in walk.calls:
            self.visit(call)
        for key in walk.output_keys:
            self.block(self.layouts.get(key), "reaches a model output")

    def visit(self, call: Call) -> None:
        shapes = self.walk.shapes
        inputs = call.data_inputs
        in_layouts = tuple(self.layouts.get(k) for k in inputs)
        out_shape = shapes[call.outputs[0]]
        rank = len(shapes[inputs[0]]) if inputs else None
        spec = spec_for(call.layer, rank)
        unsharable = call.shared and (not _sharable(spec) or id(call.layer) in self.opaque_shared)
        if len(call.outputs) != 1 or not inputs or unsharable:
            spec = LayerSpec("opaque")
        out = self.propagate(call, spec, in_layouts, out_shape)
        if call.shared and out is not None:
            out = self.share(call, spec, in_layouts, out)
        if call.shared and out is None:  # then no call of the layer may change its weights
            self.opaque_shared.add(id(call.layer))
            for layout in self.first_call.pop(id(call.layer), ()):
                self.block(layout, f"{call.name!r} shares its weights with an opaque call")
        if out is not None and out.width * out.spatial != _channels(out_shape):
            self.block(out, f"channel bookkeeping disagrees with {call.name!r}'s shape")
            out = None
        if out is None:
            why = self.opaque_why(call, rank)
            for layout in in_layouts:
                self.block(layout, f"consumed by {call.name!r} ({call.class_name}), {why}")
            out = self.new_group(_channels(out_shape), f"produced by {call.name!r}, {why}")
        for key in call.outputs:
            self.layouts[key] = out
            self.producer_of[key] = call.name
        self.nodes.append(
            LayerNode(
                name=call.name,
                class_name=call.class_name,
                role=spec.role if out is not None else "opaque",
                layer=call.layer,
                inputs=tuple(self.producer_of.get(k, k) for k in inputs),
                input_shapes=tuple(shapes[k] for k in inputs),
                output_shape=out_shape,
                out_layout=out,
                in_layouts=in_layouts,
                inner_layout=self.inner.get(call.name),
            )
        )

    def share(self, call: Call, spec: LayerSpec, ins: tuple[Layout, ...], out: Layout):
        """Every call of a shared layer reads and writes the same channels (its weights
        are one): later calls join their input to the first call's, and a producer's
        output is the first call's group. None (opaque) when the layouts differ."""
        key = id(call.layer)
        if key not in self.first_call:
            self.first_call[key] = (ins[0], out)
            return out
        first_in, first_out = self.first_call[key]
        if not _same_shape(first_in, ins[0]):
            return None
        if spec.role == "producer" or call.layer.weights:  # a weightless one needs no join
            for a, b in zip(first_in.segments, ins[0].segments, strict=True):
                self.uf.union(a.group, b.group)
        if spec.role != "producer":
            return out
        for segment in out.segments:  # the group this call made is the first call's
            self.uf.union(first_out.segments[0].group, segment.group)
        return first_out

    @staticmethod
    def opaque_why(call: Call, rank: int | None) -> str:
        """Why ``call`` is opaque: its layer's type, or (a layer tf_balancer prunes when
        called once) calls of a shared layer whose channels differ."""
        if call.shared and _sharable(spec_for(call.layer, rank)):
            return "a layer shared by calls whose channels differ"
        return why_opaque(call.layer, rank)

    def propagate(
        self, call: Call, spec: LayerSpec, ins: tuple[Layout | None, ...], out_shape: tuple
    ) -> Layout | None:
        """The output layout of ``call``; None means opaque."""
        if any(layout is None for layout in ins):
            return None
        first = ins[0]
        if spec.role == "producer":
            if len(ins) != 1 or (spec.groups > 1 and not _one_group(first)):
                return None
            self.add_members(call.name, "consumer", first)
            out = self.produce(call, out_shape)
            if spec.groups > 1 and out is not None:
                for layout in (first, out):
                    self.blocks.append((layout.segments[0].group, spec.groups))
            return out
        if spec.role == "attention":
            return self.attend(call, ins, out_shape)
        if spec.role in ("passthrough", "reduce"):
            if len(ins) != 1 or (first.spatial > 1 and spec.ch_axes):
                return None
            self.add_members(call.name, "passthrough", first)
            return first
        if spec.role == "flatten":
            spatial = math.prod(self.walk.shapes[call.inputs[0]][1:-1])
            return Layout(first.segments, first.spatial * spatial)
        if spec.role == "concat":
            if any(layout.spatial > 1 for layout in ins):
                return None
            return Layout(tuple(s for layout in ins for s in layout.segments))
        if spec.role == "merge":
            return self.merge(call, ins)
        return None

    def produce(self, call: Call, out_shape: tuple) -> Layout | None:
        """A producer's new group; a ``Bidirectional`` layer's output holds it once
        per direction (``merge_mode="concat"``), side by side."""
        channels = _channels(out_shape)
        size = width_of(call.layer) or channels
        if channels % size:
            return None
        coupled = couples_channels(call.layer)
        layout = self.new_group(size, (coupled and "softmax output") or _frozen(call))
        self.add_members(call.name, "producer", layout)
        return Layout(layout.segments * (channels // size))

    def attend(self, call: Call, ins: tuple[Layout, ...], out_shape: tuple) -> Layout:
        """``MultiHeadAttention``: its heads become a group; the widths it reads
        and writes (the model width of a transformer) stay whole."""
        why = f"attention {call.name!r} reads and writes the model width, which stays whole"
        for layout in ins:
            self.block(layout, why)
        heads = self.new_group(width_of(call.layer), _frozen(call))
        config = call.layer.get_config()
        self.units[heads.segments[0].group] = int(config.get("value_dim") or config["key_dim"])
        self.add_members(call.name, "producer", heads)
        self.inner[call.name] = heads
        return self.new_group(_channels(out_shape), why)

    def merge(self, call: Call, ins: tuple[Layout, ...]) -> Layout:
        if all(len(x.segments) == 1 and x.spatial == 1 for x in ins):
            sizes = {x.segments[0].size for x in ins}
            if len(sizes) == 1:
                for layout in ins[1:]:
                    self.uf.union(ins[0].segments[0].group, layout.segments[0].group)
                return ins[0]
        for layout in ins:
            self.block(layout, f"merged by {call.name!r} with a differently laid-out tensor")
        return ins[0]

    def add_members(self, node: str, role: str, layout: Layout) -> None:
        for segment, offset in layout.with_offsets():
            member = Member(node, role, offset, layout.width, layout.spatial)
            self.members.append((segment.group, member))

    def groups(self) -> tuple[dict[int, int], tuple[ChannelGroup, ...]]:
        roots: dict[int, int] = {}
        for gid in range(len(self.uf.parent)):
            roots.setdefault(self.uf.find(gid), len(roots))
        renumber = {gid: roots[self.uf.find(gid)] for gid in range(len(self.uf.parent))}
        members: dict[int, list[Member]] = {g: [] for g in roots.values()}
        reasons: dict[int, list[str]] = {g: [] for g in roots.values()}
        sizes = {renumber[g]: size for g, size in self.sizes.items()}
        units = {renumber[g]: unit for g, unit in self.units.items()}
        blocks: dict[int, int] = {}  # sizes divide by every count, so by their lcm
        for gid, count in self.blocks:
            blocks[renumber[gid]] = math.lcm(blocks.get(renumber[gid], 1), count)
        for gid, member in self.members:
            members[renumber[gid]].append(member)
        for gid, reason in self.reasons:
            if reason not in reasons[renumber[gid]]:
                reasons[renumber[gid]].append(reason)
        groups = tuple(
            ChannelGroup(
                g,
                sizes[g],
                tuple(members[g]),
                tuple(reasons[g]),
                units.get(g, 1),
                blocks.get(g, 1),
            )
            for g in sorted(roots.values())
        )
        return renumber, groups


def _one_group(layout: Layout) -> bool:
    """A layout that is one group's channels, once (what a grouped conv can read)."""
    return len(layout.segments) == 1 and layout.spatial == 1


def _channels(shape: tuple) -> int:
    return int(shape[-1]) if len(shape) > 1 and shape[-1] is not None else 1


def _renumber_layout(layout: Layout | None, renumber: dict[int, int]) -> Layout | None:
    if layout is None:
        return None
    segments = tuple(Segment(renumber[s.group], s.size) for s in layout.segments)
    return Layout(segments, layout.spatial)


class LayerGraph:
    """Layers, edges and channel groups of a tf_keras model.

    Build it with :meth:`from_model`. Nodes are in topological order; nested
    models are flattened (their layers are named ``outer/inner``).

    Attributes:
        model: the model the graph describes (not modified).
        walk: the flattened call sequence the graph was built from.
        nodes: ``name -> LayerNode`` in topological order.
        groups: all channel groups, prunable or not, by id.
    """

    def __init__(
        self,
        walk: Walk,
        nodes: list[LayerNode],
        groups: tuple[ChannelGroup, ...],
        model: Any = None,
    ):
        self.model = model
        self.walk = walk
        self.nodes = {node.name: node for node in nodes}
        self.groups = {group.id: group for group in groups}

    @classmethod
    def from_model(cls, model: Any) -> LayerGraph:
        """Analyse a functional or Sequential Keras model (not modified).

        Raises:
            UnsupportedModelError: an input axis is open and has no nominal size
                (:mod:`tf_balancer.input_shapes`), so layer shapes are unknown.
        """
        return cls.from_walk(walk_model(model), model)

    @classmethod
    def from_walk(cls, walk: Walk, model: Any = None) -> LayerGraph:
        """:meth:`from_model` of a model's :class:`~tf_balancer.graph.walk.Walk`, or of
        a walk no model has yet (a chain of passes costs each rewrite's walk before
        building the one model that comes out of it)."""
        declared = [tuple(t.shape) for t in walk.input_tensors]
        if walk.nominal is None and has_open_axes(declared):
            raise UnsupportedModelError(open_axes_message(f"model {walk.model_name!r}", declared))
        builder = _Builder(walk)
        builder.run()
        renumber, groups = builder.groups()
        nodes = [
            dataclasses.replace(
                node,
                out_layout=_renumber_layout(node.out_layout, renumber),
                in_layouts=tuple(_renumber_layout(x, renumber) for x in node.in_layouts),
                inner_layout=_renumber_layout(node.inner_layout, renumber),
            )
            for node in builder.nodes
        ]
        return cls(builder.walk, nodes, groups, model)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable and g.nodes("producer")]

    def group_of(self, node: str) -> int | None:
        """The group of a node's own channels (its heads for attention; None for an
        output made of several groups)."""
        layout = self.nodes[node].channel_layout
        if layout is None or len({s.group for s in layout.segments}) != 1:
            return None
        return layout.segments[0].group

    def consumers(self, node: str) -> list[str]:
        return [n.name for n in self.nodes.values() if node in n.inputs]

    def edges(self) -> list[tuple[str, str]]:
        """Producer -> consumer pairs between layer calls."""
        return [(src, n.name) for n in self.nodes.values() for src in n.inputs if src in self.nodes]
