"""Cluster roles, chief-only files and the strategies the callback refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer.training.cluster import Cluster, local_tf_configs


def _cluster(spec: dict, task_type: str | None, task_id: int | None) -> Cluster:
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type=task_type, task_id=task_id
    )
    return Cluster(types.SimpleNamespace(cluster_resolver=resolver))


def test_local_tf_configs_give_each_worker_its_own_port_and_index():
    configs = [json.loads(c) for c in local_tf_configs(3)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)


@pytest.mark.parametrize(
    "spec, task, chief",
    [
        ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
        ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
        ({"chief": ["c:1"], "worker": ["a:1"], "evaluator": ["e:1"]}, ("evaluator", 0), False),
    ],
)
def test_the_chief_is_the_chief_task_or_else_worker_0(spec, task, chief):
    cluster = _cluster(spec, *task)
    assert cluster.is_chief is chief
    assert cluster.num_workers == len(spec.get("chief", [])) + len(spec["worker"])
    assert cluster.multi_worker


def test_outside_multi_worker_training_this_process_is_the_chief_and_nothing_is_reduced():
    cluster = Cluster.current()
    assert cluster.is_chief and not cluster.multi_worker
    scores = {3: np.array([0.5, 2.0]), 1: np.array([1.0])}
    assert cluster.mean_scores(scores) == scores
    keep = {3: np.array([1]), 1: np.array([0])}
    assert cluster.chief_keep(keep, {3: 2, 1: 1}) == keep
    assert cluster.write_path("out/model") == "out/model"


def test_other_workers_write_to_a_temporary_sibling_and_leave_nothing(tmp_path):
    worker = _cluster({"worker": ["a:1", "b:1"]}, "worker", 1)
    target = str(tmp_path / "export")
    written = worker.write_path(target)
    assert os.path.dirname(written) == str(tmp_path) and "workertemp_1" in written
    os.makedirs(os.path.join(written, "saved_model"))
    worker.remove_temp(written, target)
    assert os.listdir(tmp_path) == []

    logs = str(tmp_path / "logs")
    temp_logs = worker.write_dir(logs)
    os.makedirs(temp_logs)
    worker.remove_temp(temp_logs, logs)
    assert os.listdir(tmp_path) == []  # the log dir made only for the temp one is gone too


_PARAMETER_SERVERS = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    from tf_balancer import BalanceCallback, ConfigError
    from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data
    from tf_balancer.training.cluster import local_tf_configs

    worker, ps, chief = json.loads(local_tf_configs(3)[0])["cluster"]["worker"]
    spec = tf.train.ClusterSpec({"chief": [chief], "worker": [worker], "ps": [ps]})
    servers = [
        tf.distribute.Server(spec, job_name=job, task_index=0, protocol="grpc", start=True)
        for job in ("worker", "ps")
    ]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, rpc_layer="grpc", task_type="chief", task_id=0
    )
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    data = load_digits_data(0)
    with strategy.scope():
        model = compile_classifier(build_digits_cnn(width=8))
    dataset = tf.data.Dataset.from_tensor_slices((data.x_train[:64], data.y_train[:64]))
    try:
        model.fit(dataset.repeat().batch(32), epochs=1, steps_per_epoch=2,
                  callbacks=[BalanceCallback(verbose=0)], verbose=0)
    except ConfigError as err:
        print("REFUSED", err)
    """
)


def test_parameter_server_training_is_refused_at_train_begin_naming_what_works():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _PARAMETER_SERVERS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REFUSED")]
    assert lines, done.stderr[-3000:]
    assert "does not support ParameterServerStrategy;" in lines[0]
    assert "MultiWorkerMirroredStrategy" in lines[0]
