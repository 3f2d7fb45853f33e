"""BalanceCallback under MultiWorkerMirroredStrategy: two real worker processes on 127.0.0.1.

Each test starts the workers of ``multiworker_job.py`` with their own ``TF_CONFIG``
(free ports from :func:`~tf_balancer.training.cluster.local_tf_configs`), waits a
bounded time and always reaps both processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tf_balancer.training.cluster import local_tf_configs

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_job.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(JOB)))
TIMEOUT = 900  # seconds for a whole run of two workers (2 cores shared with other tests)

pytestmark = pytest.mark.slow


def _start(job: str, workdir: str, kill_after: dict[int, int] | None = None):
    procs = []
    for index, config in enumerate(local_tf_configs(2)):
        env = {**os.environ, "TF_CONFIG": config, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if kill_after and index in kill_after:
            env["KILL_AFTER_EPOCH"] = str(kill_after[index])
        log = open(os.path.join(workdir, f"worker{index}.log"), "a", encoding="utf-8")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, JOB, job, workdir],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()  # the child holds its own copy
    return procs


def _reap(procs, timeout: float) -> list[int]:
    """Wait for every process (``timeout`` seconds in all); kill what is left."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        return [-1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _run(job: str, workdir: str) -> list[dict]:
    codes = _reap(_start(job, workdir), TIMEOUT)
    assert codes == [0, 0], _logs(workdir)
    return [_result(workdir, i) for i in range(2)]


def _result(workdir: str, index: int) -> dict:
    with open(os.path.join(workdir, f"worker{index}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _logs(workdir: str) -> str:
    out = []
    for index in range(2):
        path = os.path.join(workdir, f"worker{index}.log")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as handle:
                out.append(f"--- worker {index}\n{handle.read()[-4000:]}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def criteria_runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("criteria"))
    return _run("criteria", workdir)


def test_every_criterion_and_mode_gives_both_workers_the_same_plans_and_weights(criteria_runs):
    chief, other = criteria_runs
    assert sorted(chief) == sorted(other)
    assert len(chief) == 8  # every criterion, a mix, and sparse mode
    for name in chief:
        plans = chief[name]["plans"]
        assert plans == other[name]["plans"], f"{name}: kept channels differ"
        assert chief[name]["trained"] == other[name]["trained"], f"{name}: trained weights"
        assert chief[name]["optimized"] == other[name]["optimized"], f"{name}: optimized weights"
        assert chief[name]["rebalances"] == 2, name
        assert chief[name]["sparsity"] > 0.2, f"{name}: nothing pruned"
        rates = chief[name]["logged_rates"]  # Keras sums step logs over workers
        assert {"accuracy", "macro_recall", "macro_f1"} <= set(rates), name
        assert all(0.0 <= v <= 1.0 for values in rates.values() for v in values), (name, rates)
        if not name.startswith("sparse"):
            assert chief[name]["flops_ratio"] <= 0.5 + 0.01, name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, _run("fault", workdir)


def test_only_the_chief_writes_the_export_and_the_tensorboard_logs(uninterrupted):
    workdir, (chief, other) = uninterrupted
    assert chief["final"] == other["final"] and chief["optimized"] == other["optimized"]
    assert chief["rebalances"] == 3
    leftovers = [name for name in os.listdir(workdir) if "workertemp" in name]
    assert leftovers == [] and os.path.isfile(
        os.path.join(workdir, "export", "saved_model", "saved_model.pb")
    )
    logs = os.listdir(os.path.join(workdir, "logs"))
    assert logs and all(name.startswith("events.out.tfevents") for name in logs), logs


def test_a_killed_worker_restarted_from_backup_reaches_the_uninterrupted_plan(
    uninterrupted, tmp_path
):
    workdir = str(tmp_path)
    procs = _start("fault", workdir, kill_after={1: 2})
    try:
        assert procs[1].wait(timeout=TIMEOUT) != 0  # SIGKILLed after epoch 2's backup
        # Worker 0's next collective op fails once the dead peer misses its heartbeats;
        # a scheduler would restart it too. Bounded: killed if it waits longer.
        _reap(procs[:1], 180)
    finally:
        _reap(procs, 1)
    assert not os.path.exists(os.path.join(workdir, "worker0.json"))  # it did not finish

    chief, other = _run("fault", workdir)  # restarted with new ports, same backup_dir
    assert sorted(chief["plans"], key=int) == ["3", "4"]  # resumed at epoch 3
    _, (expected, _) = uninterrupted
    assert chief["plans"] == other["plans"]
    assert chief["plans"]["3"] == expected["plans"]["3"]  # the rebalance redone after restart
    assert chief["final"] == expected["final"] == other["final"]
    assert chief["rebalances"] == expected["rebalances"]
