"""``strip_training_ops``: drop layers that are the identity at inference.

Dropout and its variants, Gaussian noise, ``ActivityRegularization`` and the
random data-augmentation layers (``RandomFlip``, ``RandomRotation``, ...) only act
during training (``ActivityRegularization`` adds a loss term and passes its input
through). At
inference each is the identity, so the pass removes them and wires their input
straight to their consumers. A call made with ``training=True`` (Monte Carlo
dropout) is not an identity and is kept. Only these exact Keras classes are
removed; subclasses may override ``call`` and are left alone.

Example:
    >>> from tf_balancer._compat import builtin_layer_name, keras
    >>> from tf_balancer.graph.layer_graph import LayerGraph
    >>> inp = keras.Input((4,))
    >>> x = keras.layers.Dropout(0.5, name="drop")(keras.layers.Dense(3)(inp))
    >>> model = keras.Model(inp, keras.layers.Dense(2, name="out")(x))
    >>> result = StripTrainingOps().run(model, LayerGraph.from_model(model), PassContext())
    >>> result.changed, result.stats["removed"]
    (True, ('drop',))
"""

from __future__ import annotations

from typing import Any

from tf_balancer._compat import builtin_layer_name
from tf_balancer.graph.walk import Call
from tf_balancer.passes._rebuild import IDENTITY, forced_training, rebuilt_result, walk_of
from tf_balancer.passes.base import GraphPass, PassContext, PassResult, register_pass

__all__ = ["StripTrainingOps", "TRAINING_ONLY_LAYERS"]


TRAINING_ONLY_LAYERS: tuple[str, ...] = (
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "AlphaDropout",
    "GaussianNoise",
    "GaussianDropout",
    "ActivityRegularization",
    # data augmentation: random during training, the identity at inference
    *("RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"),
    *("RandomBrightness", "RandomHue", "RandomSaturation", "RandomGrayscale", "RandomSharpness"),
    *("RandomShear", "RandomColorJitter", "RandomColorDegeneration", "RandomPosterization"),
    *("RandomInvert", "RandomPerspective", "RandomGaussianBlur", "RandomErasing"),
    *("RandAugment", "AugMix", "CutMix", "MixUp"),
)
"""Built-in layer classes that are the identity at inference (matched exactly, not by subclass)."""


def _is_training_only(call: Call) -> bool:
    return (
        builtin_layer_name(call.layer) in TRAINING_ONLY_LAYERS
        and len(call.inputs) == 1
        and len(call.outputs) == 1
        and not forced_training(call)
    )


@register_pass("strip_training_ops")
class StripTrainingOps(GraphPass):
    """Remove Dropout, SpatialDropout, AlphaDropout, Gaussian noise/dropout,
    ActivityRegularization and random augmentation layers; see the module docstring.

    Stats:
        removed: names of the removed layer calls, in topological order.
    """

    def run(self, model: Any, graph: Any, ctx: PassContext) -> PassResult:
        walk = walk_of(model, graph)
        removed = tuple(call.name for call in walk.calls if _is_training_only(call))
        if not removed:
            return PassResult(model, changed=False, message="no training-only layers")
        message = f"removed {len(removed)} training-only layers: {', '.join(removed)}"
        return rebuilt_result(
            model, walk, dict.fromkeys(removed, IDENTITY), message, {"removed": removed}
        )
