"""Custom layers made of Keras layers and operations (Keras' own examples write Transformer
blocks this way) are analysed and pruned through their functional twin; what cannot be
recorded, or owns weights of its own, stays one opaque call."""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels

KERASES = {"tf_keras": keras, "keras3": keras3}


@pytest.fixture(params=sorted(KERASES))
def kx(request):
    return KERASES[request.param]


def transformer_block(kx):
    """The ``TransformerBlock`` of Keras' text-classification example (sublayers named)."""

    class TransformerBlock(kx.layers.Layer):
        def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
            super().__init__(**kwargs)
            self.att = kx.layers.MultiHeadAttention(num_heads, embed_dim, name="att")
            self.ffn = kx.Sequential(  # named: the test reads names
                [
                    kx.layers.Dense(ff_dim, activation="relu", name="ffn_in"),
                    kx.layers.Dense(embed_dim, name="ffn_out"),
                ],
                name="ffn",
            )
            self.layernorm1 = kx.layers.LayerNormalization(epsilon=1e-6)
            self.layernorm2 = kx.layers.LayerNormalization(epsilon=1e-6)
            self.dropout1 = kx.layers.Dropout(rate)
            self.dropout2 = kx.layers.Dropout(rate)

        def call(self, inputs, training=False):
            attn_output = self.dropout1(self.att(inputs, inputs), training=training)
            out1 = self.layernorm1(inputs + attn_output)
            ffn_output = self.dropout2(self.ffn(out1), training=training)
            return self.layernorm2(out1 + ffn_output)

    return TransformerBlock


def _text_classifier(kx):
    kx.utils.set_random_seed(0)
    inp = kx.Input((12,), dtype="int32")
    y = kx.layers.Embedding(50, 16, name="embed")(inp)
    y = transformer_block(kx)(16, 2, 24, name="block")(y)
    y = kx.layers.Dense(20, activation="relu", name="hidden")(kx.layers.GlobalAveragePooling1D()(y))
    return kx.Model(inp, kx.layers.Dense(3, name="head")(y))


def _tokens():
    return np.random.default_rng(0).integers(0, 50, (4, 12)).astype("int32")


def test_a_custom_transformer_block_is_pruned_inside_and_compacts_exactly(kx):
    model = _text_classifier(kx)
    analysis = analyze(model)
    prunable = {p for g in analysis.graph.prunable_groups for p in g.nodes("producer")}
    # heads, the FFN's hidden units, and the layer after the block (before: the block
    # was one opaque call, and only "hidden" was prunable)
    assert prunable == {"block/att", "block/ffn/ffn_in", "hidden"}
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    small = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    x = _tokens()
    expected = np.asarray(masked_copy(analysis.graph, plan)(x, training=False))
    np.testing.assert_allclose(np.asarray(small(x, training=False)), expected, 1e-4, 1e-4)
    assert analyze(small).cost.flops <= 0.5 * analysis.cost.flops * 1.01
    assert model.get_layer("block").att.get_weights()[0].shape[1] == 2  # the user's is whole


def test_a_custom_layer_written_with_keras_ops_passes_channels_through():
    class Swish(keras3.layers.Layer):
        def call(self, x):
            return x * keras3.ops.sigmoid(x)

    inp = keras3.Input((8, 8, 3))
    y = Swish(name="swish")(keras3.layers.Conv2D(16, 3, name="conv")(inp))
    model = keras3.Model(inp, keras3.layers.Dense(2)(keras3.layers.GlobalAveragePooling2D()(y)))
    groups = analyze(model).graph.prunable_groups
    assert any("conv" in g.nodes("producer") for g in groups)


def test_a_custom_layer_keras_applications_define_is_walked_like_a_users():
    """InceptionResNetV2's ``CustomScaleLayer`` (``x + y * scale``, in ``keras.src``): the
    two convs it merges become one prunable group and compact exactly."""
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    keras3.utils.set_random_seed(0)
    inp = keras3.Input((8, 8, 3))
    a = keras3.layers.Conv2D(16, 1, name="a")(inp)
    b = keras3.layers.Conv2D(16, 3, padding="same", name="b")(inp)
    y = CustomScaleLayer(0.17, name="scale")([a, b])
    model = keras3.Model(inp, keras3.layers.Dense(2)(keras3.layers.GlobalAveragePooling2D()(y)))
    analysis = analyze(model)
    group = analysis.graph.group_of("a")
    assert group == analysis.graph.group_of("b")
    assert analysis.graph.groups[group].prunable
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    expected = np.asarray(masked_copy(analysis.graph, plan)(x))
    np.testing.assert_allclose(np.asarray(result.model(x)), expected, rtol=1e-4, atol=1e-5)


class _Scale(keras.layers.Layer):
    """A per-channel weight of its own: the twin could not hold it."""

    def build(self, shape):
        self.gamma = self.add_weight(name="gamma", shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


class _BranchOnTensor(keras.layers.Layer):
    """Python control flow on a tensor: not recordable on symbolic inputs."""

    def call(self, x):
        if tf.reduce_sum(x) > 0:
            return x
        return -x


@pytest.mark.parametrize("custom", [_Scale, _BranchOnTensor])
def test_a_custom_layer_that_cannot_be_recorded_stays_one_opaque_call(custom):
    inp = keras.Input((6,))
    y = custom(name="custom")(keras.layers.Dense(8, name="producer")(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(y))
    graph = analyze(model).graph
    assert "custom" in graph.nodes
    dense = next(g for g in graph.groups.values() if "producer" in g.nodes("producer"))
    assert not dense.prunable and any("'custom'" in r for r in dense.reasons)


def token_and_position_embedding(kx):
    """Keras' example layer: positions from the input's length (a scalar and a vector in
    the recorded graph, without a batch axis)."""
    arange = (lambda n: keras3.ops.arange(0, n)) if kx is keras3 else tf.range
    length = (lambda x: keras3.ops.shape(x)[-1]) if kx is keras3 else (lambda x: tf.shape(x)[-1])

    class TokenAndPositionEmbedding(kx.layers.Layer):
        def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
            super().__init__(**kwargs)
            self.token_emb = kx.layers.Embedding(vocab_size, embed_dim)
            self.pos_emb = kx.layers.Embedding(maxlen, embed_dim)

        def call(self, x):
            return self.token_emb(x) + self.pos_emb(arange(length(x)))

    return TokenAndPositionEmbedding


@pytest.mark.slow
def test_the_keras_example_transformer_trains_pruned_with_the_default_callback(kx):
    import tf_balancer as tfb

    kx.utils.set_random_seed(0)
    inp = kx.Input((12,), dtype="int32")
    y = token_and_position_embedding(kx)(12, 50, 16, name="embed")(inp)
    y = transformer_block(kx)(16, 2, 24, name="block")(y)
    y = kx.layers.Dense(20, activation="relu")(kx.layers.GlobalAveragePooling1D()(y))
    model = kx.Model(inp, kx.layers.Dense(2, activation="softmax")(y))
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).integers(0, 50, (128, 12)).astype("int32")
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, (x[:, 0] > 25).astype("int32"), epochs=4, callbacks=[callback], verbose=0)
    assert callback.report["final_flops_ratio"] <= 0.505
    np.testing.assert_allclose(
        callback.optimized_model.predict(x[:16], verbose=0),
        model.predict(x[:16], verbose=0),
        1e-4,
        1e-5,
    )


def test_a_custom_layer_that_adds_a_loss_stays_whole(kx):
    """The twin would drop the ``add_loss`` term (training the optimized model without it)."""
    mean = keras3.ops.mean if kx is keras3 else tf.reduce_mean

    class ActivityPenalty(kx.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = kx.layers.Dense(16, activation="relu")

        def call(self, x):
            y = self.dense(x)
            self.add_loss(0.01 * mean(y**2))
            return y

    inp = kx.Input((8,))
    y = ActivityPenalty(name="penalised")(inp)
    graph = analyze(kx.Model(inp, kx.layers.Dense(3)(y))).graph
    assert "penalised" in graph.nodes and graph.nodes["penalised"].role == "opaque"


def test_a_custom_layer_whose_compute_mask_its_twin_drops_stays_whole_and_compacts_exactly():
    """A token-and-position embedding with ``compute_mask`` (padding) and a position range
    read from the input's shape: in tf_keras its twin's output carried no mask, so the
    compacted model attended to and averaged over the padding (0.06 off the masked model
    on padded text; ``prune_channels`` failed verification and was rolled back)."""
    length, vocab = 8, 20

    class TokenAndPosition(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.token = keras.layers.Embedding(vocab, 16, mask_zero=True)
            self.position = keras.layers.Embedding(length, 16)

        def call(self, x):
            return self.token(x) + self.position(tf.range(tf.shape(x)[-1]))

        def compute_mask(self, x, mask=None):
            return self.token.compute_mask(x)

    keras.utils.set_random_seed(0)
    inp = keras.Input((length,), dtype="int32")
    h = TokenAndPosition(name="embed")(inp)
    h = keras.layers.MultiHeadAttention(4, 4)(h, h)
    h = keras.layers.Dense(32, activation="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))
    analysis = analyze(model)
    assert analysis.graph.nodes["embed"].role == "opaque"
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    assert result.changed
    x = np.random.default_rng(0).integers(1, vocab, (4, length)).astype("int32")
    x[:, 5:] = 0  # padded
    expected = np.asarray(masked_copy(analysis.graph, plan)(x, training=False))
    np.testing.assert_allclose(np.asarray(result.model(x, training=False)), expected, 1e-4, 1e-5)


def test_a_custom_layer_that_reads_the_padding_mask_stays_whole(kx):
    """A block whose ``call(x, mask=None)`` masks its attention and pools inside (its
    output carries no mask): its twin ran the call without the mask Keras passes it."""
    ops = keras3.ops if kx is keras3 else tf
    expand = ops.expand_dims

    class MaskedPool(kx.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.att = kx.layers.MultiHeadAttention(4, 4)
            self.ffn = kx.layers.Dense(32, activation="relu")
            self.pool = kx.layers.GlobalAveragePooling1D()

        def call(self, x, mask=None):
            attention_mask = None if mask is None else expand(mask, 1)
            return self.pool(self.ffn(self.att(x, x, attention_mask=attention_mask)))

        def compute_mask(self, x, mask=None):
            return None

    inp = kx.Input((8,), dtype="int32")
    h = MaskedPool(name="block")(kx.layers.Embedding(20, 16, mask_zero=True)(inp))
    graph = analyze(kx.Model(inp, kx.layers.Dense(3)(kx.layers.Dense(16)(h)))).graph
    assert "block" in graph.nodes and graph.nodes["block"].role == "opaque"
