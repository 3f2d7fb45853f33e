"""Fold inference batch norms into the preceding conv / matmul of a frozen GraphDef.

For a chain ``P -> [BiasAdd] -> [Reshape] -> FusedBatchNorm*`` (``is_training``
false) where ``P`` is ``Conv2D``, ``DepthwiseConv2dNative`` or ``MatMul`` and every
weight and statistic is a ``Const`` (possibly behind ``Identity`` nodes), with
``s = scale / sqrt(variance + epsilon)``::

    kernel' = kernel * s        (per output channel)
    bias'   = (bias - mean) * s + offset     (bias = 0 without a BiasAdd)

The kernel's output channel is the last axis of a ``Conv2D`` filter, ``in * mult``
(axes 2 and 3, flattened) of a depthwise filter, and axis 1 (axis 0 with
``transpose_b``) of a ``MatMul`` weight. ``FusedBatchNorm`` needs a 4-D input, so
a ``MatMul`` reaches it through a ``Reshape`` to ``[..., C]`` (NHWC only).

Rewrite: the kernel constant is replaced (in place when nothing else reads it,
else by a new ``Const``); an existing ``BiasAdd`` gets ``bias'`` and the BN's
consumers are rewired to the BN's input; without a ``BiasAdd`` the BN node is
replaced by a ``BiasAdd`` of the same name, so its consumers need no change.
Constants (and their ``Identity`` reads) that end up unused are removed, with
any control edges to them; everything else is left untouched.

A BN is *not* folded (and is reported in ``stats["skipped"]`` with the reason)
when it is training-mode, an output other than 0 is read, a weight or statistic
is not constant, or an intermediate tensor of the chain has another consumer or
is named in ``protected``. Only top-level nodes are rewritten, not the bodies
of functions in the graph's library.

Example:
    >>> folded, stats = fold_batchnorm_graphdef(traced.graph_def)  # doctest: +SKIP
    >>> stats["folds"], stats["op_types_after"].get("FusedBatchNormV3", 0)  # doctest: +SKIP
    (52, 0)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.graph.grappler import op_type_counts

__all__ = ["fold_batchnorm_graphdef", "BN_OPS", "KERNEL_OPS"]

_LOG = logging.getLogger(__name__)

BN_OPS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
KERNEL_OPS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul"})
_FLOAT_TYPES = frozenset(t.as_datatype_enum for t in (tf.float16, tf.float32, tf.float64))


class _Refuse(Exception):
    """Internal: this BN cannot be folded; the message is the reason."""


def _split(ref: str) -> tuple[str, int]:
    """``"a:1" -> ("a", 1)``, ``"a" -> ("a", 0)``; control refs are handled by callers."""
    name, _, index = ref.partition(":")
    return name, int(index) if index else 0


class _Index:
    """Name -> node, and who reads each node (data and control edges)."""

    def __init__(self, graph_def: Any):
        self.nodes = {node.name: node for node in graph_def.node}
        self.data: dict[str, list[tuple[str, int, int]]] = {}  # src -> (dst, slot, out)
        self.control: dict[str, list[str]] = {}
        for node in graph_def.node:
            for slot, ref in enumerate(node.input):
                if ref.startswith("^"):
                    self.control.setdefault(ref[1:], []).append(node.name)
                else:
                    src, out = _split(ref)
                    self.data.setdefault(src, []).append((node.name, slot, out))

    def producer(self, ref: str) -> Any:
        name, out = _split(ref)
        if out != 0 or name not in self.nodes:
            raise _Refuse(f"input {ref!r} is not output 0 of a node")
        return self.nodes[name]

    def const_path(self, ref: str) -> list[Any]:
        """``[Const, Identity, ...]`` nodes behind a data input, Const first."""
        path = [self.producer(ref)]
        while path[0].op == "Identity":
            path.insert(0, self.producer(path[0].input[0]))
        if path[0].op != "Const":
            raise _Refuse(f"{ref!r} is not a constant (comes from a {path[0].op})")
        return path

    def const_value(self, ref: str) -> np.ndarray:
        return tf.make_ndarray(self.const_path(ref)[0].attr["value"].tensor)


@dataclasses.dataclass(frozen=True)
class _Chain:
    bn: Any
    producer: Any
    bias_add: Any | None
    reshape: Any | None


def _attr_str(node: Any, key: str, default: str) -> str:
    return node.attr[key].s.decode() if key in node.attr else default


def _only_reader(index: _Index, node: Any, reader: Any, protected: Collection[str]) -> None:
    if node.name in protected:
        raise _Refuse(f"{node.name} is protected")
    readers = [dst for dst, _, _ in index.data.get(node.name, ())]
    if readers != [reader.name]:
        raise _Refuse(f"{node.name} has other consumers than {reader.name}")


def _match(index: _Index, bn: Any, protected: Collection[str]) -> _Chain:
    """The chain ending at ``bn``, or :class:`_Refuse` with the reason."""
    if bn.attr["is_training"].b:
        raise _Refuse("training-mode batch norm")
    if bn.attr["T"].type not in _FLOAT_TYPES:
        raise _Refuse("not a floating-point batch norm")
    if any(out > 0 for _, _, out in index.data.get(bn.name, ())):
        raise _Refuse("outputs 1..5 (batch statistics) are consumed")
    fmt = _attr_str(bn, "data_format", "NHWC")
    if fmt not in ("NHWC", "NCHW"):
        raise _Refuse(f"data_format {fmt}")
    found: dict[str, Any] = {"Reshape": None, "BiasAdd": None}
    node, reader = index.producer(bn.input[0]), bn
    for op in ("Reshape", "BiasAdd"):
        if node.op == op:
            _only_reader(index, node, reader, protected)
            found[op], node, reader = node, index.producer(node.input[0]), node
    if node.op not in KERNEL_OPS:
        raise _Refuse(f"input comes from a {node.op}, not one of {sorted(KERNEL_OPS)}")
    _only_reader(index, node, reader, protected)
    chain = _Chain(bn, node, found["BiasAdd"], found["Reshape"])
    _check_layout(index, chain, fmt)
    if chain.bias_add is not None and any(r.startswith("^") for r in bn.input):
        raise _Refuse("the batch norm has control inputs")
    if chain.bias_add is not None and bn.name in protected:
        raise _Refuse(f"{bn.name} is protected")
    return chain


def _check_layout(index: _Index, chain: _Chain, fmt: str) -> None:
    """The BN's channel axis must be the kernel's output channel axis."""
    is_matmul = chain.producer.op == "MatMul"
    if is_matmul != (chain.reshape is not None):
        raise _Refuse("a MatMul must reach the batch norm through a Reshape (and only a MatMul)")
    want = "NHWC" if is_matmul else _attr_str(chain.producer, "data_format", "NHWC")
    if fmt != want:
        raise _Refuse(f"batch norm is {fmt} but its input is {want}")
    if chain.bias_add is not None and _attr_str(chain.bias_add, "data_format", "NHWC") != want:
        raise _Refuse("BiasAdd data_format differs from the kernel's")
    if chain.reshape is not None:
        shape = index.const_value(chain.reshape.input[1]).reshape(-1)
        channels = int(index.const_value(chain.bn.input[1]).size)
        if shape.size != 4 or int(shape[-1]) != channels:
            raise _Refuse(f"Reshape to {shape.tolist()} does not keep {channels} channels last")


def _scaled_kernel(producer: Any, kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``kernel`` with its output channels multiplied by ``scale`` (float64)."""
    if producer.op == "Conv2D":
        if kernel.shape[-1] != scale.size:
            raise _Refuse(f"filter {kernel.shape} has not {scale.size} output channels")
        return kernel * scale
    if producer.op == "DepthwiseConv2dNative":
        if kernel.shape[2] * kernel.shape[3] != scale.size:
            raise _Refuse(f"depthwise filter {kernel.shape} has not {scale.size} channels")
        return kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    axis = 0 if producer.attr["transpose_b"].b else 1
    if kernel.ndim != 2 or kernel.shape[axis] != scale.size:
        raise _Refuse(f"MatMul weight {kernel.shape} has not {scale.size} outputs on axis {axis}")
    return kernel * (scale[:, None] if axis == 0 else scale)


def _folded_values(index: _Index, chain: _Chain) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel', bias')`` in the kernel's dtype."""
    kernel = index.const_value(chain.producer.input[1])
    gamma, beta, mean, var = (
        index.const_value(ref).astype(np.float64) for ref in chain.bn.input[1:5]
    )
    scale = gamma / np.sqrt(var + chain.bn.attr["epsilon"].f)
    bias = np.zeros_like(scale)
    if chain.bias_add is not None:
        bias = index.const_value(chain.bias_add.input[1]).astype(np.float64)
    new_kernel = _scaled_kernel(chain.producer, kernel.astype(np.float64), scale)
    new_bias = (bias - mean) * scale + beta
    return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)


class _Rewriter:
    """Applies one fold to a GraphDef (mutable; rebuilt index per fold)."""

    def __init__(self, graph_def: Any, index: _Index):
        self.graph_def, self.index = graph_def, index
        self.detached: list[str] = []

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.index.nodes:
            name, k = f"{base}_{k}", k + 1
        return name

    def _const(self, name: str, value: np.ndarray, device: str) -> str:
        node = self.graph_def.node.add(name=self._unique(name), op="Const", device=device)
        node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        self.index.nodes[node.name] = node
        return node.name

    def set_const_input(self, node: Any, slot: int, value: np.ndarray, name: str) -> None:
        """Give ``node``'s input ``slot`` the value; in place if no one else reads it."""
        path = self.index.const_path(node.input[slot])
        if all(len(self.index.data.get(p.name, ())) == 1 for p in path):
            path[0].attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
            return
        self.detached.extend(p.name for p in path)
        node.input[slot] = self._const(name, value, node.device)

    def remove_bn(self, bn: Any, replacement: str) -> None:
        """Rewire ``bn``'s readers to ``replacement`` (a tensor ref) and delete it."""
        for dst, slot, _ in self.index.data.get(bn.name, ()):
            self.index.nodes[dst].input[slot] = replacement
        for dst in self.index.control.get(bn.name, ()):
            node = self.index.nodes[dst]
            node.input[list(node.input).index(f"^{bn.name}")] = f"^{_split(replacement)[0]}"
        _delete_nodes(self.graph_def, {bn.name})

    def bn_to_bias_add(self, bn: Any, bias: np.ndarray) -> None:
        """Turn the BN node into ``BiasAdd(x, bias)`` under the same name."""
        bias_name = self._const(f"{bn.name}/folded_bias", bias, bn.device)
        controls = [ref for ref in bn.input if ref.startswith("^")]
        fmt, dtype = _attr_str(bn, "data_format", "NHWC"), bn.attr["T"].type
        x = bn.input[0]
        bn.ClearField("attr")
        bn.ClearField("input")
        bn.op = "BiasAdd"
        bn.input.extend([x, bias_name, *controls])
        bn.attr["T"].type = dtype
        bn.attr["data_format"].s = fmt.encode()


def _apply(graph_def: Any, index: _Index, chain: _Chain) -> None:
    kernel, bias = _folded_values(index, chain)
    rewriter = _Rewriter(graph_def, index)
    params = [p.name for ref in chain.bn.input[1:5] for p in index.const_path(ref)]
    rewriter.set_const_input(chain.producer, 1, kernel, f"{chain.producer.name}/folded_kernel")
    if chain.bias_add is not None:
        rewriter.set_const_input(chain.bias_add, 1, bias, f"{chain.bias_add.name}/folded_bias")
        rewriter.remove_bn(chain.bn, chain.bn.input[0])
    else:
        rewriter.bn_to_bias_add(chain.bn, bias)
    _remove_unused(graph_def, params + rewriter.detached)


def _delete_nodes(graph_def: Any, names: set[str]) -> None:
    """Delete nodes in place (no copies of the remaining nodes' tensors)."""
    for i in reversed(range(len(graph_def.node))):
        if graph_def.node[i].name in names:
            del graph_def.node[i]


def _remove_unused(graph_def: Any, candidates: list[str]) -> None:
    """Delete candidate Const/Identity nodes whose value nothing reads any more.

    Control edges to them are dropped too: waiting for a constant orders nothing
    (frozen graphs keep such edges from the variable reads they replaced).
    """
    pending = set(candidates)
    while True:
        index = _Index(graph_def)
        dead = {n for n in pending if n in index.nodes and not index.data.get(n)}
        if not dead:
            return
        _delete_nodes(graph_def, dead)
        controls = {f"^{n}" for n in dead}
        for node in graph_def.node:
            if any(ref in controls for ref in node.input):
                refs = [ref for ref in node.input if ref not in controls]
                del node.input[:]
                node.input.extend(refs)
        pending -= dead


def fold_batchnorm_graphdef(
    graph_def: Any, protected: Collection[str] = ()
) -> tuple[Any, dict[str, Any]]:
    """Fold constant inference batch norms into the preceding kernels.

    Args:
        graph_def: a frozen ``GraphDef``; it is not modified.
        protected: node names whose output must keep its value and name (e.g.
            fetched nodes that are not behind an ``Identity``).

    Returns:
        ``(new_graph_def, stats)`` with stats ``folds`` (count), ``folded`` (BN
        names), ``skipped`` (BN name -> reason), ``op_types_before``,
        ``op_types_after``.

    Example:
        >>> folded, stats = fold_batchnorm_graphdef(graph_def)  # doctest: +SKIP
    """
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    protected = frozenset(protected)
    folded, skipped = [], {}
    for name in [n.name for n in graph_def.node if n.op in BN_OPS]:
        index = _Index(out)
        try:
            chain = _match(index, index.nodes[name], protected)
            _apply(out, index, chain)
        except _Refuse as reason:
            skipped[name] = str(reason)
            _LOG.debug("not folding %s: %s", name, reason)
            continue
        folded.append(name)
    _LOG.debug("folded %d batch norm(s), skipped %d", len(folded), len(skipped))
    stats = {
        "folds": len(folded),
        "folded": folded,
        "skipped": skipped,
        "op_types_before": op_type_counts(graph_def),
        "op_types_after": op_type_counts(out),
    }
    return out, stats
