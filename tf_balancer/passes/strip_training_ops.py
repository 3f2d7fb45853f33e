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

from tf_balancer._compat import builtin_layer_name
from tf_balancer.graph.walk import Call, Walk
from tf_balancer.passes._rebuild import IDENTITY, RebuildPass, Rewrite, forced_training
from tf_balancer.passes.base import PassContext, register_pass

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
class StripTrainingOps(RebuildPass):
    """Remove Dropout, SpatialDropout, AlphaDropout, Gaussian noise/dropout,
    ActivityRegularization and random augmentation layers; see the module docstring.

    Stats:
        removed: names of the removed layer calls, in topological order.
    """

    nothing_to_do = "no training-only layers"

    def rewrite(self, walk: Walk, ctx: PassContext) -> Rewrite | None:
        removed = tuple(call.name for call in walk.calls if _is_training_only(call))
        if not removed:
            return None
        message = f"removed {len(removed)} training-only layers: {', '.join(removed)}"
        return Rewrite(dict.fromkeys(removed, IDENTITY), message, {"removed": removed})
