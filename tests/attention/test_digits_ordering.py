"""End to end on the digits CNN: cost-aware balancing beats the two baselines.

The same trained model is pruned to half its FLOPs three ways - ``balanced``
and ``uniform`` on first-order Taylor scores, and ``global`` on magnitude scores
(one global magnitude ranking, the baseline the issue defines) - and each
masked copy is evaluated on the validation split without retraining.

One trained model is a single sample: over many seeds ``balanced`` wins most
but not every time, so the claim tested is about the mean over three seeds. The
runs happen in a fresh subprocess, so the training trajectories do not depend
on what other tests did to the process's random state.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TARGET = 0.5
SEEDS = (0, 1, 2)

_SCRIPT = """
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import allocate
from tf_balancer.attention.importance import ProbeData, group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data

target, seeds = float(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
results = []
for seed in seeds:
    data = load_digits_data(seed)
    model = compile_classifier(build_digits_cnn(seed=seed))
    model.fit(data.x_train, data.y_train, epochs=5, batch_size=32, verbose=0)
    analysis = analyze(model)
    probe = ProbeData(data.x_train, data.y_train, batch_size=128, max_batches=4)
    taylor = group_scores(analysis.graph, probe, "taylor")
    magnitude = group_scores(analysis.graph, None, "magnitude")
    row = {}
    for strategy, scores in {"balanced": taylor, "uniform": taylor, "global": magnitude}.items():
        plan = allocate(analysis, scores, target, "flops", strategy)
        masked = masked_copy(analysis.graph, plan)
        predicted = np.argmax(masked.predict(data.x_val, batch_size=256, verbose=0), axis=-1)
        row[strategy] = {"accuracy": float(np.mean(predicted == data.y_val)), "achieved": plan.achieved}
    results.append(row)
print("RESULT " + json.dumps(results))
"""


@pytest.mark.slow
def test_balanced_allocation_keeps_more_accuracy_than_uniform_and_global_magnitude():
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(TARGET), ",".join(map(str, SEEDS))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    mean = {
        s: sum(r[s]["accuracy"] for r in results) / len(results)
        for s in ("balanced", "uniform", "global")
    }
    summary = f"mean accuracy {mean}; per seed {results}"
    assert mean["balanced"] > mean["uniform"], summary
    assert mean["balanced"] > mean["global"], summary
    for row in results:
        achieved = [row[s]["achieved"] for s in row]
        assert all(ratio <= TARGET for ratio in achieved), summary
        assert max(achieved) - min(achieved) <= 0.05, summary
