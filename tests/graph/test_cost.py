"""Tests for tf_balancer.graph.cost: FLOPs agree with TF's profiler, plans with smaller models."""

from __future__ import annotations

import math

import pytest
from conftest import profiler_flops

from tf_balancer._compat import keras
from tf_balancer.analysis import ModelAnalysis, analyze
from tf_balancer.graph.cost import PlanCoster, core_flops, measured_layer_flops, model_cost
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.trace import trace_keras

L = keras.layers
_CORE_LAYERS = ("Conv2D", "DepthwiseConv2D", "Dense")


def _plan_model(f1: int, f2: int, f3: int, f4: int) -> keras.Model:
    """Conv/BN/DW/pool, a residual Add, a Concatenate, Flatten -> Dense, softmax head."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(f1, 3, padding="same", name="c1")(inp)
    x = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    p = L.MaxPooling2D(name="pool")(x)
    a = L.Conv2D(f2, 3, padding="same", name="c2a")(p)
    b = L.Conv2D(f2, 1, name="c2b")(p)
    s = L.Add(name="add")([a, b])
    c = L.Conv2D(f3, 1, activation="swish", name="c3")(p)
    x = L.Flatten(name="flat")(L.Concatenate(name="cat")([s, c]))
    x = L.Dense(f4, activation="relu", name="d1")(x)
    return keras.Model(inp, L.Dense(3, activation="softmax", name="out")(x))


def _small_models() -> list[keras.Model]:
    keras.utils.set_random_seed(1)
    seq = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(8, 3, strides=2, name="c"),
            L.BatchNormalization(name="bn"),
            L.Activation("swish", name="act"),
            L.SeparableConv2D(6, 3, padding="same", name="sep"),
            L.AveragePooling2D(name="avg"),
            L.GlobalMaxPooling2D(name="gmp"),
            L.Dense(4, name="o"),
        ]
    )
    return [seq, _plan_model(8, 6, 4, 10)]


@pytest.fixture(scope="module")
def resnet_analysis(resnet50) -> ModelAnalysis:
    return analyze(resnet50)


@pytest.fixture(scope="module")
def mobilenet_analysis(mobilenet_v2) -> ModelAnalysis:
    return analyze(mobilenet_v2)


@pytest.fixture(scope="module")
def plan_analysis() -> ModelAnalysis:
    return analyze(_plan_model(8, 6, 4, 10))


@pytest.fixture(scope="module")
def big_analyses(resnet_analysis, mobilenet_analysis) -> dict[str, ModelAnalysis]:
    return {"resnet50": resnet_analysis, "mobilenet_v2": mobilenet_analysis}


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_total_flops_match_the_profiler(name, big_analyses):
    analysis = big_analyses[name]
    expected = profiler_flops(analysis.traced.graph)
    assert expected > 0
    assert analysis.cost.flops == pytest.approx(expected, rel=0.01)


def test_total_flops_match_the_profiler_on_small_models():
    for model in _small_models():
        for batch_size in (1, 2):
            analysis = analyze(model, batch_size=batch_size)
            expected = profiler_flops(analysis.traced.graph)
            assert analysis.cost.flops == pytest.approx(expected, rel=0.01), model.name


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_every_core_op_of_big_models_is_attributed_to_its_layer(name, big_analyses):
    traced, graph = big_analyses[name].traced, big_analyses[name].graph
    core_ops = [
        n.name
        for n in traced.graph_def.node
        if n.op in ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BiasAdd")
    ]
    assert len(core_ops) > 50
    for op in core_ops:
        layer = traced.op_to_layer[op]
        assert graph.nodes[layer].class_name in _CORE_LAYERS, op


def test_resnet50_flops_are_the_known_figure(resnet_analysis):
    # ResNet50 at 224x224: ~3.9 GMACs, i.e. ~7.7 GFLOPs.
    assert 7.5e9 < resnet_analysis.cost.flops < 8.0e9


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_analytic_core_flops_match_the_profiler_per_layer(name, big_analyses):
    analysis = big_analyses[name]
    checked = 0
    for node in analysis.graph.nodes.values():
        if node.class_name not in _CORE_LAYERS:
            continue
        if node.layer.get_config().get("activation") in ("softmax", "log_softmax"):
            continue
        cin, cout = int(node.input_shapes[0][-1]), int(node.output_shape[-1])
        assert core_flops(node, 1, cin, cout) == analysis.measured_flops[node.name], node.name
        checked += 1
    assert checked > 50


def test_analytic_core_flops_of_small_layers():
    model = _small_models()[0]
    graph = LayerGraph.from_model(model)
    measured = measured_layer_flops(trace_keras(model, batch_size=2))
    for name in ("c", "sep", "o"):
        node = graph.nodes[name]
        cin, cout = int(node.input_shapes[0][-1]), int(node.output_shape[-1])
        assert core_flops(node, 2, cin, cout) == measured[name], name


def test_conv_flops_formula():
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, L.Conv2D(4, 3, name="c")(inp))
    report = model_cost(LayerGraph.from_model(model), model=model)
    assert report.layers["c"].flops == 2 * 6 * 6 * 4 * 3 * 3 * 3 + 6 * 6 * 4


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_params_equal_count_params(name, big_analyses, request):
    model = request.getfixturevalue(name)
    assert big_analyses[name].cost.params == model.count_params()


def test_params_equal_count_params_on_small_models():
    for model in _small_models():
        assert analyze(model).cost.params == model.count_params()


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_activation_bytes_are_output_elements_times_four(name, big_analyses):
    analysis = big_analyses[name]
    for node in analysis.graph.nodes.values():
        elements = math.prod(int(d) for d in node.output_shape[1:])
        assert analysis.cost.layers[node.name].activation_bytes == 4 * elements, node.name


def test_activation_bytes_scale_with_batch_size():
    model = _small_models()[1]
    graph = LayerGraph.from_model(model)
    one = model_cost(graph, batch_size=1, model=model)
    three = model_cost(graph, batch_size=3, model=model)
    for name, cost in one.layers.items():
        assert three.layers[name].activation_bytes == 3 * cost.activation_bytes
    assert three.flops == pytest.approx(3 * one.flops, rel=1e-9)


def test_cost_under_a_plan_equals_the_smaller_model(plan_analysis):
    full = plan_analysis
    small_model = _plan_model(5, 3, 2, 7)
    small = analyze(small_model)
    graph = full.graph
    keep = {
        graph.group_of("c1"): 5,
        graph.group_of("add"): 3,
        graph.group_of("c3"): 2,
        graph.group_of("d1"): 7,
    }
    assert len(keep) == 4 and all(graph.groups[g].prunable for g in keep)
    planned = model_cost(graph, keep=keep, model=full.model)
    assert planned.flops == small.cost.flops == profiler_flops(small.traced.graph)
    assert planned.params == small_model.count_params()
    assert planned.activation_bytes == small.cost.activation_bytes
    assert planned.layers == small.cost.layers
    assert full.cost_under(keep) == planned


def test_empty_plan_is_the_full_cost(plan_analysis):
    full = plan_analysis
    assert full.cost_under({}) == full.cost
    assert model_cost(full.graph, keep=None, measured=full.measured_flops) == full.cost


def test_plan_coster_totals_equal_model_cost(plan_analysis):
    full = plan_analysis
    graph = full.graph
    coster = PlanCoster(graph, full.measured_flops, batch_size=1)
    for kept in (8, 5, 1):
        keep = {graph.group_of("c1"): kept, graph.group_of("d1"): kept}
        report = full.cost_under(keep)
        assert coster.total(keep, "flops") == pytest.approx(report.flops)
        assert coster.total(keep, "params") == pytest.approx(report.params)


def test_attention_einsums_are_counted_like_a_hand_count():
    """TF's profiler has no statistics for Einsum: attention FLOPs were silently 0."""
    from tf_balancer.graph.trace import op_flops

    t, d, heads, key_dim = 8, 16, 4, 8
    inp = keras.Input((t, d))
    x = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim, name="mha")(inp, inp)
    model = keras.Model(inp, x)
    analysis = analyze(model)
    graph = analysis.traced.graph
    einsum = sum(
        flops
        for name, flops in op_flops(graph).items()
        if graph.get_operation_by_name(name).type == "Einsum"
    )
    projections = 3 * 2 * t * d * heads * key_dim  # query, key, value
    scores_and_mix = 2 * (2 * heads * t * t * key_dim)  # Q.K^T and attention.V
    output = 2 * t * heads * key_dim * d
    assert einsum == projections + scores_and_mix + output
    assert analysis.cost.layers["mha"].flops >= einsum
