"""The Keras boundary: the only module that imports Keras.

Two Kerases meet here behind one small interface, :class:`KerasAdapter`:

* **Keras 2** (the ``tf_keras`` package): tfmot works only with it, so
  ``mode="sparse"`` and the ``prune_weights`` pass need it
  (:func:`ensure_keras2_model`). ``import tf_keras`` works whether or not
  ``TF_USE_LEGACY_KERAS`` is set.
* **Keras 3** (``keras`` >= 3 on the TensorFlow backend; ``tf.keras`` since TF
  2.16): the structured path (analysis, importance, masks, compaction, the
  lossless passes, export) runs on it through the same code.

Everything outside this module asks :func:`adapter_for` (or :func:`keras_of`)
for the Keras of the model at hand and uses only what both Kerases share: layer
classes by name, ``get_config``/``from_config``, ``get_weights``/``set_weights``,
``keras.Input``/``keras.Model``. The few places where the two differ - the
functional graph's nodes and how a layer is looked up by class - are methods of
the adapter.

Example:
    >>> from tf_balancer._compat import keras, adapter_for
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> adapter_for(model).version
    2
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tf_keras as keras

from tf_balancer.errors import KERAS3_FIX, UnsupportedModelError

__all__ = [
    "keras",
    "layers",
    "KerasAdapter",
    "KerasOp",
    "OpArguments",
    "op_arguments",
    "REDUCTIONS",
    "adapter_for",
    "keras_of",
    "is_keras3_object",
    "is_keras_model",
    "ensure_keras_model",
    "ensure_keras2_model",
    "is_layer",
    "builtin_layer_name",
    "load_model_file",
    "weight_attribute",
    "compute_dtype",
    "compile_arguments",
    "as_model_inputs",
]

layers = keras.layers


def _keras3() -> Any:
    """The Keras 3 module, imported on first use (None when not installed)."""
    module = sys.modules.get("keras")
    if module is None:
        try:
            import keras as module  # noqa: PLC0415
        except ImportError:  # pragma: no cover - keras 3 ships with TF >= 2.16
            return None
    return module if str(getattr(module, "__version__", "")).startswith("3") else None


class KerasAdapter:
    """What tf_balancer needs from one Keras.

    Attributes:
        keras: the Keras module (``tf_keras`` or ``keras``).
        version: 2 or 3.
    """

    def __init__(self, module: Any, version: int):
        self.keras = module
        self.version = version

    # ---------------------------------------------------------------- models
    def is_graph_network(self, model: Any) -> bool:
        """A functional or built Sequential model (its call graph is recorded)."""
        if not isinstance(model, self.keras.Model):
            return False
        if self.version == 2:
            return bool(getattr(model, "_is_graph_network", False))
        functional = self.keras.src.models.functional.Functional
        if isinstance(model, self.keras.Sequential):
            return getattr(model, "_functional", None) is not None
        return isinstance(model, functional)

    def functional_of(self, model: Any) -> Any:
        """The object holding the call graph (a Keras 3 Sequential wraps a Functional)."""
        if self.version == 3 and isinstance(model, self.keras.Sequential):
            return model._functional
        return model

    def nodes_by_depth(self, model: Any) -> dict[int, list[Any]]:
        return self.functional_of(model)._nodes_by_depth

    def graph_inputs(self, model: Any) -> list[Any]:
        return list(self.functional_of(model).inputs)

    def graph_outputs(self, model: Any) -> list[Any]:
        return list(self.functional_of(model).outputs)

    def output_names(self, model: Any) -> list[str]:
        """The names ``compile`` keys losses by and ``predict`` returns, in the order of
        ``model.outputs``: the keys of a dict of outputs, else the names of the layers
        producing them."""
        outputs = self.graph_outputs(model)
        if self.version == 2:
            names = list(model.output_names)
        else:
            names = [t._keras_history.operation.name for t in outputs]
        structure = getattr(model, "output", None)
        if isinstance(structure, dict):
            key_of = {id(t): key for key, t in structure.items()}
            names = [key_of.get(id(t), name) for t, name in zip(outputs, names, strict=True)]
        return names

    def input_names(self, model: Any) -> list[str]:
        """Names of the model's input layers."""
        if self.version == 2:
            return list(model.input_names)
        return [t._keras_history.operation.name for t in self.graph_inputs(model)]

    def functional_twin(self, model: Any) -> Any | None:
        r"""A functional model that calls a built subclassed ``model``'s own layers.

        ``model.call`` is run once on symbolic ``keras.Input``\ s, which records its
        layer calls as a functional graph; the twin shares every layer (and so every
        weight) with ``model`` and computes the same outputs. None when ``model``
        is not built yet (its input shapes are unknown).
        """
        shapes = self._built_input_shapes(model)
        if shapes is None:
            return None
        inputs = [self.keras.Input(batch_shape=(None, *shape[1:])) for shape in shapes]
        outputs = model.call(inputs[0] if len(inputs) == 1 else inputs)
        return self.keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=model.name)

    def layer_twin(self, layer: Any, node: Any) -> Any | None:
        r"""A functional model computing one call (``node``) of a custom layer, or None.

        ``layer.call`` is run on symbolic inputs shaped like the call's, which records
        the Keras layers and operations it is made of (a Transformer block of
        ``MultiHeadAttention``, ``Dense`` and ``LayerNormalization``; a swish written
        with ``keras.ops``) as a functional graph of the same layer objects. A
        ``training`` parameter is left to its default, as fit would. None when the
        call cannot be recorded that way, the layer owns weights no sublayer
        does (the graph would not hold them), or the twin would lose a Keras mask
        (padding): the call takes a ``mask`` its inputs carry (Keras passes it; the
        twin's inputs have none), or the layer's output mask (``compute_mask``) is
        not what the twin's outputs carry.
        """
        import inspect

        import tensorflow as tf

        tensors = self.node_inputs(node)
        if any(_masked(t) for t in tensors) and "mask" in inspect.signature(layer.call).parameters:
            return None
        inputs = [self.keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype) for t in tensors]
        by_id = {id(t): new for t, new in zip(tensors, inputs, strict=True)}
        args, kwargs = tf.nest.map_structure(lambda v: by_id.get(id(v), v), self.node_call(node))
        kwargs.pop("training", None)
        try:
            outputs = layer.call(*args, **kwargs)
            twin = self.keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs)
        except Exception:  # noqa: BLE001 - whatever Keras cannot record symbolically
            return None
        own = {id(w) for w in layer.weights}
        outputs = self.node_outputs(node)
        if own != {id(w) for w in twin.weights} or len(twin.outputs) != len(outputs):
            return None
        if any(_masked(t) != _masked(o) for t, o in zip(twin.outputs, outputs, strict=True)):
            return None  # the layer's compute_mask (padding) is not what its twin gives
        return twin

    def _built_input_shapes(self, model: Any) -> list[tuple] | None:
        if self.version == 2:
            spec = model.save_spec() if getattr(model, "built", False) else None
            if not spec:
                return None
            import tensorflow as tf

            return [tuple(s.shape) for s in tf.nest.flatten(spec[0])]
        shapes = getattr(model, "_build_shapes_dict", None)
        if not shapes:
            return None
        first = next(iter(shapes.values()))
        return (
            [tuple(first)] if isinstance(first[0], (int, type(None))) else list(map(tuple, first))
        )

    def layer_from_config(self, layer_type: type, config: dict[str, Any]) -> Any:
        """``layer_type.from_config(config)`` for a copy of a layer held in memory.

        Keras 3 refuses to deserialize a ``Lambda``'s Python function in its safe
        mode, which guards against loading untrusted files; this config comes
        from the user's own live layer, so safe mode is off for the copy.
        """
        if self.version == 2:
            return layer_type.from_config(config)
        from keras.src.saving.serialization_lib import SafeModeScope  # noqa: PLC0415

        with SafeModeScope(False):
            return layer_type.from_config(config)

    # ----------------------------------------------------------------- nodes
    def node_layer(self, node: Any) -> Any:
        """The layer a node calls; a Keras 3 operation (``x + 3.0``, ``keras.ops.relu``)
        comes wrapped as a :class:`KerasOp`."""
        if self.version == 2:
            return node.layer
        operation = node.operation
        if isinstance(operation, self.keras.Layer):
            return operation
        return KerasOp.of(operation, node, self.keras.KerasTensor)

    def node_inputs(self, node: Any) -> list[Any]:
        """The Keras tensors a call consumed, in argument order."""
        return list(node.keras_inputs if self.version == 2 else node.arguments.keras_tensors)

    def node_call(self, node: Any) -> tuple[list[Any], dict[str, Any]]:
        """``(args, kwargs)`` the layer was called with."""
        if self.version == 2:
            return list(node.call_args), dict(node.call_kwargs)
        return list(node.arguments.args), dict(node.arguments.kwargs)

    def node_outputs(self, node: Any) -> list[Any]:
        import tensorflow as tf

        return tf.nest.flatten(node.outputs)

    # -------------------------------------------------------------- training
    def gradient_scale(self, optimizer: Any) -> Any:
        """The factor the gradients given to ``optimizer.apply_gradients`` are multiplied by.

        Keras 3 scales the loss (``optimizer.scale_loss``: the loss scale of a
        ``LossScaleOptimizer`` under mixed precision, or ``loss_scale_factor``)
        and lets ``apply_gradients`` unscale; tf_keras' ``LossScaleOptimizer``
        unscales before ``apply_gradients``, so its gradients are unscaled (1).
        Graph-mode safe: read inside the train step, it follows a dynamic scale.
        """
        if self.version == 2:
            return 1.0
        return optimizer.scale_loss(1.0)

    @property
    def optimizer_update_method(self) -> str:
        """The optimizer method every update of a train step goes through: Keras 3's
        ``apply`` (its ``apply_gradients`` calls it, and custom train steps written
        as Keras' guide writes them call it directly), tf_keras' ``apply_gradients``
        (``minimize`` calls it)."""
        return "apply_gradients" if self.version == 2 else "apply"

    def gradient_pairs(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, list]:
        """The ``(gradient, variable)`` pairs of one call of
        :attr:`optimizer_update_method`, and its positional arguments to pass on (a
        ``zip`` given to ``apply_gradients`` can be read once: it is replaced by a list)."""
        if self.version == 2:
            pairs = list(args[0] if args else kwargs.pop("grads_and_vars"))
            return (pairs, *args[1:]), pairs
        grads = args[0] if args else kwargs["grads"]
        variables = args[1] if len(args) > 1 else kwargs.get("trainable_variables")
        if variables is None:  # Keras 3: the variables the optimizer was built with
            variables = optimizer._trainable_variables
        return args, list(zip(grads, variables, strict=True))

    @property
    def epoch_logs_method(self) -> str:
        """The ``Model`` method ``fit`` and ``evaluate`` turn the last step's logs into
        an epoch's (or an evaluation's) logs with: the metrics' own results when their
        names are the step's keys, else the step's logs. Private in both Kerases."""
        if self.version == 2:
            return "_validate_and_get_metrics_result"
        return "_get_metrics_result_or_logs"

    # --------------------------------------------------------------- building
    def input(self, shape: Sequence[Any], dtype: Any, name: str) -> Any:
        return self.keras.Input(batch_shape=tuple(shape), dtype=dtype, name=name)

    def model(self, inputs: Any, outputs: Any, name: str | None = None) -> Any:
        return self.keras.Model(inputs, outputs, name=name)

    def save_saved_model(self, model: Any, path: str) -> None:
        """Write ``model`` as a TF SavedModel for serving (no optimizer state).

        tf_keras writes a Keras SavedModel (``model.save``); Keras 3 its serving
        export (``model.export``: a ``serve`` endpoint and ``serving_default``).
        A tf_keras model whose graph reads a ``tf.Variable`` no layer owns (``x * v``
        in a functional model), which ``model.save`` refuses, is written as
        :meth:`save_serving_model` writes it: its variables, those included, and
        ``serving_default`` (no Keras metadata; ``tf.saved_model.load`` serves it).
        """
        if self.version == 3:
            model.export(path, format="tf_saved_model", verbose=False)
            return
        try:
            model.save(path, include_optimizer=False)
        except AssertionError as err:
            if "untracked" not in str(err) or not getattr(model, "inputs", None):
                raise
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            self.save_serving_model(model, path)

    def serving_function(self, model: Any) -> Any:
        """``model`` in inference mode as one ``tf.function`` over ``model.inputs``
        (batch axis open): traced once, it serves every batch size. None for a
        model without ``inputs`` (subclassed)."""
        import tensorflow as tf

        if not getattr(model, "inputs", None):
            return None
        specs = [
            tf.TensorSpec((None, *t.shape[1:]), t.dtype, f"input_{i}")
            for i, t in enumerate(model.inputs)
        ]
        # A tf.function with its signature, not a concrete function: under a
        # multi-worker strategy only that saves with distributed variables.
        return tf.function(
            lambda *x: model(as_model_inputs(model, x), training=False),
            input_signature=specs,
        )

    def save_serving_model(self, model: Any, path: str, serve: Any = None) -> None:
        """Write only what serving needs: the variables and a ``serving_default``
        signature over ``model.inputs`` (``serve``, from :meth:`serving_function`,
        when one was traced already; else Keras 3 ``model.export``, which is that;
        a subclassed tf_keras model, which has no ``inputs``: ``model.save``).

        tf_keras' ``model.save`` also traces and writes every layer's call
        functions and the Keras metadata: 13 s for ResNet50 (64x64) against 2-3 s.
        """
        import tensorflow as tf

        if serve is None and (self.version == 3 or not getattr(model, "inputs", None)):
            self.save_saved_model(model, path)
            return
        serve = serve or self.serving_function(model)
        root = tf.Module()
        # tracked, so saved with the signature: the model's variables, and any other its
        # graph reads (a tf.Variable an operation of the model uses, which no layer owns)
        read = serve.get_concrete_function().variables
        root.captured = list({id(v): v for v in [*model.variables, *read]}.values())
        try:
            tf.saved_model.save(root, path, signatures=serve)
        except AssertionError as err:  # a resource beyond the variables: a lookup table
            if "untracked" not in str(err):
                raise
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            root.model = model  # tracks every resource (slower: tf_keras traces its layers)
            tf.saved_model.save(root, path, signatures=serve)


@dataclasses.dataclass(frozen=True)
class OpArguments:
    """A tensor operation's call, as channel analysis needs it.

    Attributes:
        op: the operation, named as Keras 3 names its op classes (``"Add"``,
            ``"Relu6"``, ``"Mean"``).
        tensors: how many arguments are Keras tensors.
        scalars: every other argument (``axis``/``keepdims``/``name`` aside) is a
            Python or NumPy scalar.
        tensor_first: the first positional argument is a Keras tensor (``x / 2``).
        axis: the axes a reduction reduces (None when not given).
    """

    op: str
    tensors: int
    scalars: bool
    tensor_first: bool
    axis: Any = None

    @classmethod
    def of(cls, op: str, args: Sequence[Any], kwargs: dict, tensor_type: type, axis: Any = None):
        import numpy as np

        if axis is None:
            axis = kwargs.get("axis", args[1] if op in REDUCTIONS and len(args) > 1 else None)
        named = {k: v for k, v in kwargs.items() if k not in ("axis", "keepdims", "name")}
        values = [*(args[:1] if op in REDUCTIONS else args), *named.values()]
        scalars = all(
            isinstance(v, (tensor_type, int, float, np.number))
            or (isinstance(v, np.ndarray) and v.ndim == 0)
            for v in values
        )
        tensors = sum(isinstance(v, tensor_type) for v in [*args, *kwargs.values()])
        first = bool(args) and isinstance(args[0], tensor_type)
        return cls(op, tensors, scalars, first, axis)


REDUCTIONS = frozenset({"Mean", "Max", "Min", "Sum"})
"""Reductions among the operations (their second argument is the axis)."""

# tf_keras records a TensorFlow function called on Keras tensors (``x + 3.0``,
# ``tf.nn.relu6(x)``) as a ``TFOpLambda`` layer; these are named as Keras 3's ops.
_TF_FUNCTIONS = {
    **dict.fromkeys(("__operators__.add", "math.add"), "Add"),
    **dict.fromkeys(("__operators__.sub", "math.subtract"), "Subtract"),
    **dict.fromkeys(("math.multiply",), "Multiply"),
    **dict.fromkeys(("math.truediv", "math.divide"), "TrueDivide"),
    **dict.fromkeys(("math.maximum",), "Maximum"),
    **dict.fromkeys(("math.minimum",), "Minimum"),
    **dict.fromkeys(("nn.relu",), "Relu"),
    **dict.fromkeys(("nn.relu6",), "Relu6"),
    **dict.fromkeys(("math.sigmoid", "nn.sigmoid"), "Sigmoid"),
    **dict.fromkeys(("nn.silu", "nn.swish"), "Silu"),
    **dict.fromkeys(("math.tanh", "nn.tanh"), "Tanh"),
    **dict.fromkeys(("nn.elu",), "Elu"),
    **dict.fromkeys(("nn.selu",), "Selu"),
    **dict.fromkeys(("nn.gelu",), "Gelu"),
    **dict.fromkeys(("nn.leaky_relu",), "LeakyRelu"),
    **dict.fromkeys(("math.softplus", "nn.softplus"), "Softplus"),
    **dict.fromkeys(("math.abs",), "Abs"),
    **dict.fromkeys(("math.negative", "__operators__.neg"), "Negative"),
    **dict.fromkeys(("math.square",), "Square"),
    **dict.fromkeys(("math.sqrt",), "Sqrt"),
    **dict.fromkeys(("clip_by_value",), "Clip"),
    **dict.fromkeys(("cast",), "Cast"),
    **dict.fromkeys(("math.exp",), "Exp"),
    **dict.fromkeys(("math.reduce_mean",), "Mean"),
    **dict.fromkeys(("math.reduce_max",), "Max"),
    **dict.fromkeys(("math.reduce_min",), "Min"),
    **dict.fromkeys(("math.reduce_sum",), "Sum"),
}


def _masked(tensor: Any) -> bool:
    """A symbolic tensor carries a Keras mask (``Embedding(mask_zero=True)``'s padding)."""
    return getattr(tensor, "_keras_mask", None) is not None


def op_arguments(layer: Any) -> OpArguments | None:
    """The :class:`OpArguments` of an operation in a model's graph: a Keras 3
    :class:`KerasOp`, or a tf_keras ``TFOpLambda`` called once; None otherwise."""
    if isinstance(layer, KerasOp):
        return layer.arguments
    if type(layer).__name__ != "TFOpLambda" or not isinstance(layer, keras.layers.Layer):
        return None
    nodes = layer.inbound_nodes
    op = _TF_FUNCTIONS.get(layer.get_config().get("function"))
    if op is None or len(nodes) != 1:
        return None
    node = nodes[0]
    from tf_keras.src.engine.keras_tensor import KerasTensor  # noqa: PLC0415

    return OpArguments.of(op, list(node.call_args), dict(node.call_kwargs), KerasTensor)


class KerasOp:
    """A Keras 3 operation in a functional graph, seen as a weightless layer.

    Keras 3 records operations next to layers: ``x + 3.0`` or ``keras.ops.relu(x)``
    in a functional model (MobileNetV3's hard-swish), or in a subclassed model's
    ``call``. They have no weights, config or ``count_params``; this wrapper gives
    them the part of the layer interface tf_balancer uses. Operations are
    stateless, so a "clone" is the same wrapper, and calling it calls the
    operation (a rebuilt Keras 3 model records it as the same native op).

    Attributes:
        op: the Keras operation; ``op_name`` its class name (``"Add"``).
        arguments: what the call passed it (:class:`OpArguments`).

    Example:
        >>> import keras as k3                                   # doctest: +SKIP
        >>> x = k3.Input((4,)); model = k3.Model(x, x * 2.0)     # doctest: +SKIP
        >>> op = adapter_for(model).node_layer(model._nodes_by_depth[0][0])  # doctest: +SKIP
        >>> op.arguments.op, op.arguments.tensors, op.arguments.scalars  # doctest: +SKIP
        ('Multiply', 1, True)
    """

    _wrappers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per operation

    def __init__(self, op: Any, args: Sequence[Any], kwargs: dict, tensor_type: type):
        self.op, self.name, self.op_name = op, op.name, type(op).__name__
        axis = getattr(op, "axis", None)
        self.arguments = OpArguments.of(self.op_name, args, kwargs, tensor_type, axis)
        self.trainable = False
        self.weights: list[Any] = []
        self.trainable_weights: list[Any] = []
        self.non_trainable_weights: list[Any] = []

    @classmethod
    def of(cls, op: Any, node: Any, tensor_type: type) -> KerasOp:
        if op not in cls._wrappers:
            arguments = node.arguments
            cls._wrappers[op] = cls(op, arguments.args, arguments.kwargs, tensor_type)
        return cls._wrappers[op]

    @property
    def class_name(self) -> str:
        """How tables name it: ``ops.Add``."""
        return f"ops.{self.op_name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.op(*args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self.op(*args, **kwargs)

    def count_params(self) -> int:
        return 0

    def get_weights(self) -> list[Any]:
        return []

    def set_weights(self, weights: Sequence[Any]) -> None:
        if len(weights):
            raise ValueError(f"operation {self.name!r} has no weights")

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


_ADAPTERS: dict[int, KerasAdapter] = {2: KerasAdapter(keras, 2)}


def _adapter(version: int) -> KerasAdapter:
    if version not in _ADAPTERS:
        module = _keras3()
        if module is None:  # pragma: no cover
            raise UnsupportedModelError("Keras 3 is not installed")
        _ADAPTERS[3] = KerasAdapter(module, 3)
    return _ADAPTERS[version]


def is_keras3_object(obj: Any) -> bool:
    """True when ``obj`` is a Keras 3 layer or model (without importing Keras 3)."""
    keras3 = sys.modules.get("keras")
    if keras3 is None or not str(getattr(keras3, "__version__", "")).startswith("3"):
        return False  # Keras 3 was never imported, so no Keras 3 object can exist.
    return isinstance(obj, keras3.Layer)


def resumed_by_backup(model: Any) -> bool:
    """True while ``BackupAndRestore`` is resuming ``model``'s ``fit`` at a later epoch
    (rather than the user passing ``initial_epoch``): Keras 3 sets the epoch to start
    from on the model, tf_keras gives it a training state to restore counters from."""
    if getattr(model, "_training_state", None) is not None:  # tf_keras
        return True
    return getattr(model, "_initial_epoch", None) is not None  # Keras 3


def keras3_weights_saveable(variables: Callable[[], list[Any]]) -> Any:
    """An object that Keras 3's weight files (``save_weights``, ``.keras``, hence
    ``BackupAndRestore``) save and restore ``variables()`` with, once set as an
    attribute of a Keras 3 model. Keras 3 walks a model's attributes for such
    objects; unlike TF checkpoints it ignores ``tf.train.Checkpoint`` ones.
    A file written without it (another model's, or before training) restores
    nothing into it rather than failing the load.
    """
    from keras.src.saving.keras_saveable import KerasSaveable

    class _Saveable(KerasSaveable):
        def _obj_type(self) -> str:
            return "Operation"  # one of the types Keras knows how to walk (no children)

        def save_own_variables(self, store: Any) -> None:
            for i, variable in enumerate(variables()):
                store[str(i)] = variable.numpy()

        def load_own_variables(self, store: Any) -> None:
            values = variables()
            try:
                saved = [store[str(i)] for i in range(len(values))]
            except (KeyError, ValueError, TypeError):
                return  # not saved with this state (or saved with another layout)
            if all(
                tuple(v.shape) == tuple(np.shape(x)) for v, x in zip(values, saved, strict=True)
            ):
                for variable, value in zip(values, saved, strict=True):
                    variable.assign(np.asarray(value))

    return _Saveable()


def is_keras_model(obj: Any) -> bool:
    """True for a Keras model of either Keras (Sequential, Functional or subclassed)."""
    if isinstance(obj, keras.Model):
        return True
    return is_keras3_object(obj) and isinstance(obj, sys.modules["keras"].Model)


def adapter_for(obj: Any) -> KerasAdapter:
    """The adapter of the Keras that ``obj`` (a layer, model or optimizer) belongs to.

    Raises:
        UnsupportedModelError: ``obj`` is not a Keras layer or model.
    """
    if isinstance(obj, (keras.layers.Layer, keras.optimizers.Optimizer)):
        return _ADAPTERS[2]
    if isinstance(obj, KerasOp):
        return _adapter(3)
    keras3 = _keras3() if "keras" in sys.modules else None
    if is_keras3_object(obj) or (keras3 and isinstance(obj, keras3.optimizers.Optimizer)):
        return _adapter(3)
    raise UnsupportedModelError(
        f"expected a Keras model (tf_keras or Keras 3), got {type(obj).__name__}"
    )


def keras_of(obj: Any) -> Any:
    """The Keras module of ``obj`` (``tf_keras`` or ``keras`` 3)."""
    return adapter_for(obj).keras


def ensure_keras_model(model: Any) -> Any:
    """Return ``model`` if it is a Keras model of either Keras, else raise a clear error."""
    if is_keras_model(model):
        return model
    raise UnsupportedModelError(
        f"expected a Keras Model (tf_keras or Keras 3), got {type(model).__name__}"
    )


def ensure_keras2_model(model: Any) -> keras.Model:
    """Return ``model`` if it is a tf_keras model, else raise a clear error.

    For what needs Keras 2 (tfmot: ``mode="sparse"``, ``prune_weights``).

    Raises:
        UnsupportedModelError: for a Keras 3 model (with the fix), or for
            anything that is not a Keras model at all.
    """
    if isinstance(model, keras.Model):
        return model
    if is_keras3_object(model):
        raise UnsupportedModelError(f"Keras 3 model given ({type(model).__name__}); {KERAS3_FIX}")
    raise UnsupportedModelError(
        f"expected a tf_keras Model, got {type(model).__name__}; {KERAS3_FIX}"
    )


def unwrap_variable(variable: Any) -> Any:
    """The ``tf.Variable`` behind a weight (a Keras 3 variable wraps one; a
    ``tf.Variable`` or a distributed variable is returned as is)."""
    import tensorflow as tf

    value = getattr(variable, "value", None)
    return value if isinstance(value, tf.Variable) else variable


def local_copies(variable: Any) -> list[Any]:
    """This process's ``tf.Variable`` copies of a weight: one per local device for a
    mirrored or sync-on-read variable under a ``tf.distribute`` strategy, else itself.

    Assigning each copy eagerly is what a cross-replica update of a mirrored
    variable does on this worker, without its per-call dispatch cost; callers do it
    at the same point with the same values on every worker.
    """
    import tensorflow as tf

    unwrapped = unwrap_variable(variable)
    if isinstance(unwrapped, tf.distribute.DistributedValues):
        return list(unwrapped.values)
    return [unwrapped]


def read_weights(layers: Sequence[Any]) -> list[list[Any]]:
    """``[layer.get_weights() for layer in layers]``, with one all-reduce per kind of
    sync-on-read weight instead of one per weight.

    Under a ``tf.distribute`` strategy a BatchNorm's moving statistics are
    sync-on-read: each replica keeps its own, and reading one eagerly averages
    them over every replica of every worker - an all-reduce each, about 6 ms and
    a wait for the slowest worker. Here the weights of all ``layers`` that share
    an aggregation and a dtype are summed in one reduction (the same sum divided
    by the replica count for ``MEAN``; ``ONLY_FIRST_REPLICA`` reads the local
    first replica, as a read does). Without a strategy this is ``get_weights``.

    Example:
        >>> read_weights([model.layers[1]])  # doctest: +SKIP
        [[array(...), array(...)]]
    """
    per_layer = [list(layer.weights) for layer in layers]
    flat = [w for weights in per_layer for w in weights]
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, weight in enumerate(flat):
        variable = unwrap_variable(weight)
        if _reducible_on_read(variable):
            key = (id(variable.distribute_strategy), variable.aggregation, variable.dtype)
            batches.setdefault(key, []).append(i)
    if not batches:
        return [layer.get_weights() for layer in layers]
    reduced: dict[int, Any] = {}
    for indices in batches.values():
        read = _reduce_on_read([unwrap_variable(flat[i]) for i in indices])
        reduced.update(zip(indices, read, strict=True))
    values = [reduced[i] if i in reduced else np.asarray(w.numpy()) for i, w in enumerate(flat)]
    bounds = np.cumsum([len(weights) for weights in per_layer])
    return [values[start:end] for start, end in zip([0, *bounds[:-1]], bounds, strict=True)]


def _reducible_on_read(variable: Any) -> bool:
    """A sync-on-read variable whose eager read is a SUM or MEAN all-reduce."""
    import tensorflow as tf

    if not isinstance(variable, tf.distribute.DistributedValues):
        return False
    if getattr(variable, "synchronization", None) != tf.VariableSynchronization.ON_READ:
        return False
    aggregation = variable.aggregation
    return aggregation in (tf.VariableAggregation.SUM, tf.VariableAggregation.MEAN)


def _reduce_on_read(variables: Sequence[Any]) -> list[Any]:
    """The cross-replica values of sync-on-read ``variables`` sharing a strategy,
    an aggregation (SUM or MEAN) and a dtype, as numpy arrays, in one all-reduce.

    Each worker sums its local copies; the first local replica sends that sum, the
    others zeros; the reduction adds the workers' sums."""
    import tensorflow as tf

    strategy = variables[0].distribute_strategy
    local = [tf.add_n([tf.reshape(c, [-1]) for c in local_copies(v)]) for v in variables]
    flat = tf.concat(local, 0)
    sent = []

    def first_local_replica(_: Any) -> tf.Tensor:
        sent.append(True)
        return flat if len(sent) == 1 else tf.zeros_like(flat)

    with strategy.scope():
        per_replica = strategy.experimental_distribute_values_from_function(first_local_replica)
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    if variables[0].aggregation == tf.VariableAggregation.MEAN:
        total = total / tf.cast(strategy.num_replicas_in_sync, total.dtype)
    sizes = [int(np.prod(v.shape)) for v in variables]
    parts = np.split(total.numpy(), np.cumsum(sizes)[:-1])
    return [part.reshape(v.shape) for part, v in zip(parts, variables, strict=True)]


def assign_local(variable: Any, value: Any) -> None:
    """Assign ``value`` to each of this process's copies of ``variable``
    (:func:`local_copies`): a plain ``assign`` on one device, and under a strategy
    about 20 ms less per variable than an eager cross-replica assignment."""
    for copy in local_copies(variable):
        copy.assign(value)


def is_layer(layer: Any, *class_names: str) -> bool:
    """True when ``layer``'s class, or one of its bases, has one of ``class_names``.

    Layer classes have the same names in both Kerases, so this is how modules
    outside ``_compat`` test a layer's type.
    """
    return any(cls.__name__ in class_names for cls in type(layer).__mro__)


def builtin_layer_name(layer: Any) -> str | None:
    """The class name of ``layer`` when it is exactly a built-in layer of its Keras.

    None for a user subclass (``class MyConv(Conv2D)``) or a custom layer: passes
    that rewrite layers match built-in classes exactly, never by subclass.
    """
    name = type(layer).__name__
    try:
        builtin = getattr(keras_of(layer).layers, name, None)
    except UnsupportedModelError:
        return None
    return name if type(layer) is builtin else None


def saved_by_keras3(path: str) -> bool:
    """True for a ``.keras`` archive written by Keras 3 (its ``metadata.json`` says so)."""
    import json
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        if "metadata.json" not in archive.namelist():
            return False
        version = json.loads(archive.read("metadata.json")).get("keras_version", "")
    return str(version).startswith("3")


def load_model_file(path: str) -> Any:
    """Load a Keras model file or Keras SavedModel with the Keras that wrote it (uncompiled)."""
    if path.endswith(".keras") and saved_by_keras3(path):
        return _adapter(3).keras.saving.load_model(path, compile=False)
    return keras.models.load_model(path, compile=False)


_WEIGHT_ALIASES = {"depthwise_kernel": "kernel"}  # Keras 3 DepthwiseConv keeps it as `kernel`


def weight_attribute(layer: Any, attr: str) -> str:
    """The attribute of ``layer`` that holds the weight tf_keras calls ``attr``.

    The two Kerases name a few weights differently (Keras 3's DepthwiseConv2D
    stores ``depthwise_kernel`` as ``kernel``); specs and passes use tf_keras names.
    """
    alias = _WEIGHT_ALIASES.get(attr)
    if alias and not hasattr(layer, attr) and hasattr(layer, alias):
        return alias
    return attr


# Significand bits of the floating-point compute dtypes: fewer bits, less precise.
_PRECISION_BITS = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


def compute_dtype(model: Any) -> str:
    """The least precise floating-point compute dtype among ``model``'s layers.

    Under a mixed-precision policy most layers compute in float16 (or bfloat16)
    while some, such as a final ``Dense(dtype="float32")``, compute in float32:
    the model's results carry the rounding of the least precise one. Read from
    each layer's ``compute_dtype`` (its ``dtype_policy``), nested models
    included; ``"float32"`` when no layer computes in a floating-point dtype.

    Example:
        >>> inp = keras.Input((4,))
        >>> half = keras.layers.Dense(2, dtype="mixed_float16")(inp)
        >>> compute_dtype(keras.Model(inp, keras.layers.Dense(2, dtype="float32")(half)))
        'float16'
    """
    found = [str(getattr(layer, "compute_dtype", None)) for layer in layers_of(model)]
    floats = [name for name in found if name in _PRECISION_BITS]
    return min(floats, key=_PRECISION_BITS.__getitem__, default="float32")


def sublayers(model: Any) -> list[Any]:
    """Every layer inside ``model`` at any depth: unlike :func:`layers_of`, a custom
    layer's own sublayers too (the ``Embedding`` of a token-and-position embedding)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def layers_of(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' layers included (not the models themselves)."""
    out = []
    for layer in getattr(model, "layers", ()):
        inner = getattr(layer, "layers", None)
        out.extend(layers_of(layer) if inner else [layer])
    return out


def compile_arguments(model: Any) -> dict[str, Any] | None:
    """The arguments ``model`` was compiled with, as the objects given (None when not
    compiled or not recorded).

    Both Kerases keep them for ``get_compile_config``, which serializes them; a
    plain function given as a metric or loss serializes by name only and cannot be
    deserialized again unless it is registered. These live objects can: the
    functions are reused, and :class:`Metric` objects must be copied by the caller
    (a metric's state belongs to one model).
    """
    config = getattr(model, "_compile_config", None)
    arguments = getattr(config, "config", None)
    return dict(arguments) if isinstance(arguments, dict) else None


def as_model_inputs(model: Any, arrays: Sequence[Any]) -> Any:
    """``arrays`` (one per input, in ``model.inputs`` order) in the structure ``model``
    is called with: a dict by input name for a model built on a dict of inputs
    (``keras.Model({"img": img, "aux": aux}, ...)``, which Keras 3 refuses to call
    with a list), else a list, or the array itself for one input.

    Example:
        >>> img, aux = keras.Input((4,), name="img"), keras.Input((2,), name="aux")
        >>> joined = keras.layers.Concatenate()([img, aux])
        >>> model = keras.Model({"img": img, "aux": aux}, keras.layers.Dense(1)(joined))
        >>> sorted(as_model_inputs(model, ["a", "i"]).items())  # model.inputs: aux, img
        [('aux', 'a'), ('img', 'i')]
    """
    try:
        structure = model.input
    except Exception:  # noqa: BLE001 - a subclassed model, or not a model
        structure = None
    if isinstance(structure, Mapping) and len(structure) == len(arrays):
        # a dict's inputs are flattened in key order, as Keras lists them in `inputs`
        return dict(zip(sorted(structure), arrays, strict=True))
    return list(arrays) if len(arrays) > 1 else arrays[0]
