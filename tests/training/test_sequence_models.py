"""``BalanceCallback`` on a transformer, an LSTM and a Bidirectional GRU (digits as sequences).

A real ``fit`` with the callback on its defaults (target 0.5 FLOPs, Taylor from
the training batches): heads and units are removed, the result costs at most
the target, each head's attention is logged (report and TensorBoard), and the
exported SavedModel computes what the optimized model computes.
"""

from __future__ import annotations

import glob
import os

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_balancer as tfb
from tf_balancer.demo_sequences import (
    build_digits_bigru,
    build_digits_lstm,
    build_digits_transformer,
    load_digit_sequences,
)

CASES = {
    "transformer-keras3": (build_digits_transformer, keras3, ("mha0", "mha1"), "num_heads"),
    "lstm-tf_keras": (build_digits_lstm, tf_keras, ("lstm1", "lstm2"), "units"),
    "bigru-keras3": (build_digits_bigru, keras3, ("bigru",), None),
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    build, k, layers, width_key = CASES[request.param]
    data = load_digit_sequences(0)
    model = build(k)
    model.compile(
        k.optimizers.Adam(3e-3),
        k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    root = tmp_path_factory.mktemp(request.param)
    callback = tfb.BalanceCallback(verbose=0, log_dir=str(root / "tb"))
    history = model.fit(
        data.x_train,
        data.y_train,
        epochs=4,
        batch_size=32,
        validation_data=(data.x_val, data.y_val),
        callbacks=[callback],
        verbose=0,
    )
    return {
        "model": model,
        "callback": callback,
        "history": history.history,
        "data": data,
        "layers": layers,
        "width_key": width_key,
        "root": root,
        "name": request.param,
    }


def _width(layer, key):
    config = layer.get_config()
    return config[key] if key else config["layer"]["config"]["units"]


def test_the_result_is_narrower_and_within_the_target(trained):
    callback = trained["callback"]
    assert callback.report["final_flops_ratio"] <= 0.5 + 1e-9
    for name in trained["layers"]:
        before = _width(trained["model"].get_layer(name), trained["width_key"])
        after = _width(callback.optimized_model.get_layer(name), trained["width_key"])
        assert after < before, name
    assert {"val_macro_recall", "val_macro_f1"} <= set(trained["history"])


def test_the_exported_savedmodel_computes_the_optimized_model(trained, tmp_path):
    callback, data = trained["callback"], trained["data"]
    path = callback.export(str(tmp_path / "out"))
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    serve = loaded.signatures["serving_default"]
    x = tf.constant(data.x_val[:16])
    exported = list(serve(x).values())[0].numpy()
    expected = np.asarray(callback.optimized_model(x, training=False))
    np.testing.assert_allclose(exported, expected, atol=1e-4)


def test_each_head_has_its_attention_in_the_report_and_tensorboard(trained):
    """Heads (transformer) get per-head attention adding up to the layer's; layers
    without heads (LSTM, GRU, Dense) get none."""
    rows = {row["layer"]: row for row in trained["callback"].report["layers"]}
    has_heads = trained["width_key"] == "num_heads"
    for name, row in rows.items():
        assert ("head_attention" in row) == (has_heads and name in trained["layers"]), name
    tags = set()
    pattern = str(trained["root"] / "tb" / "**" / "events.out.tfevents.*")
    for path in glob.glob(pattern, recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    head_tags = {t for t in tags if t.startswith("balancer_head_attention/")}
    if not has_heads:
        assert head_tags == set()
        return
    for name in trained["layers"]:
        heads = rows[name]["head_attention"]
        assert len(heads) == 4 and min(heads) >= 0
        assert sum(heads) == pytest.approx(rows[name]["attention"], rel=1e-6)
    assert {f"balancer_head_attention/mha0/head{i}" for i in range(4)} <= head_tags
