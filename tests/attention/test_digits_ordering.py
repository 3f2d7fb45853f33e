"""End to end on the digits CNN: cost-aware balancing beats the two baselines.

The same trained model is pruned to half its FLOPs three ways - ``balanced``
and ``uniform`` on first-order Taylor scores, and ``global`` on magnitude scores
(one global magnitude ranking, the baseline the issue defines) - and each
masked copy is evaluated on the validation split without retraining.
"""

from __future__ import annotations

import numpy as np
import pytest

from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import allocate
from tf_balancer.attention.importance import ProbeData, group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data

TARGET = 0.5


def _accuracy(model, x, y) -> float:
    predictions = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1)
    return float(np.mean(predictions == y))


@pytest.mark.slow
def test_balanced_allocation_keeps_more_accuracy_than_uniform_and_global_magnitude():
    data = load_digits_data(0)
    model = compile_classifier(build_digits_cnn(seed=0))
    model.fit(data.x_train, data.y_train, epochs=5, batch_size=32, verbose=0)
    analysis = analyze(model)
    probe = ProbeData(data.x_train, data.y_train, batch_size=128, max_batches=4)
    taylor = group_scores(analysis.graph, probe, "taylor")
    magnitude = group_scores(analysis.graph, None, "magnitude")
    runs = {"balanced": taylor, "uniform": taylor, "global": magnitude}
    accuracy, achieved = {}, {}
    for strategy, scores in runs.items():
        plan = allocate(analysis, scores, TARGET, "flops", strategy)
        achieved[strategy] = plan.achieved
        masked = masked_copy(analysis.graph, plan)
        accuracy[strategy] = _accuracy(masked, data.x_val, data.y_val)
    summary = f"accuracy {accuracy}, achieved FLOPs ratio {achieved}"
    assert accuracy["balanced"] > accuracy["uniform"], summary
    assert accuracy["balanced"] > accuracy["global"], summary
    assert all(ratio <= TARGET for ratio in achieved.values()), summary
    assert max(achieved.values()) - min(achieved.values()) <= 0.05, summary
