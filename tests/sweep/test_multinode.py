"""A sweep on a multi-node Ray cluster, on one machine: trials spread over nodes, one store, node loss.

The scenario (``python tests/sweep/test_multinode.py OUT``) runs inside fresh network, PID and mount
namespaces (``unshare``): the network has only a loopback interface, so nothing any Ray process binds
is reachable from outside; every process it starts dies with it. In there it starts an MLflow tracking
server on 127.0.0.1 (as the head does on a real cluster), a Ray head (1 CPU, no GPU) and three worker
nodes (3 CPUs and 1 fake GPU each) with ``ray.cluster_utils.Cluster``, and runs the smoke sweep against
it with ``sweeps/layerwise.py --address``: two trials at once, each reserving a whole worker
(0.5 GPU for the trial, two 0.25-GPU bundles for its subset tasks). While the first trial evaluates its
layer subsets as Ray tasks, the worker node it runs on is killed. Ray's own records say where things ran:
GCS task events give the node of every trial (``ImplicitFunc.train``) and subset (``_subset_task``)
task and the process that ran it, and Tune's result rows give each trial's process id.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sweeps" / "layerwise.py"
REPORT = "report.json"
N_TRIALS, N_SUBSETS = 2, 7  # smoke backbone: 3 blocks + early / mid / late / all
SWEEP_OVERRIDES = [
    f"search.num_samples={N_TRIALS}",
    "max_failures=2",
    "resources.cpus_per_trial=1",
    "resources.gpus_per_trial=0.5",
    "trial.laplace.predictive=nn",  # subsets as Ray tasks in child bundles: the nn predictive
    "resources.eval_tasks=2",
    "resources.cpus_per_eval_task=1",
    "resources.gpus_per_eval_task=0.25",
    "resources.max_concurrent=2",
]
WORKER = {"num_cpus": 3, "num_gpus": 1}  # exactly one trial (1 + 2 CPUs, 0.5 + 2 x 0.25 GPUs)
# A killed node is declared dead after ~5 s instead of ~30 s (lenient enough for a loaded machine).
FAST_FAILURE_DETECTION = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 5,
}


def _agent_ports(i: int) -> dict[str, int]:
    """Fixed agent ports for node i (free: the namespace has its own ports). A raylet whose agents
    pick their own ports waits for them to write port files, and gives up after ~15 s on a busy
    machine."""
    base = 20000 + 10 * i
    return {
        "metrics_agent_port": base,
        "dashboard_agent_listen_port": base + 1,
        "runtime_env_agent_port": base + 2,
    }


# --- the scenario, run inside the namespaces --------------------------------------------------------


def _start_mlflow(out: Path, port: int = 5000) -> subprocess.Popen:
    import urllib.request

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{out / 'mlflow.db'}",
            "--artifacts-destination",
            str(out / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=open(out / "mlflow-server.log", "w"),  # noqa: SIM115 - the server outlives this call
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the MLflow server did not come up; see mlflow-server.log")


def _node_of(pid: int, raylets: dict[int, str]) -> str | None:
    """The node whose raylet started process ``pid`` (Ray workers are its children)."""
    import psutil

    proc = psutil.Process(pid)
    while proc is not None:
        if proc.pid in raylets:
            return raylets[proc.pid]
        proc = proc.parent()
    return None


def _task_events() -> list[dict]:
    """Every task attempt the GCS recorded: name, node, worker pid, parent task, state."""
    import ray

    rows = []
    for e in ray._private.state.state._get_all_task_events():
        su = e.state_updates
        rows.append(
            {
                "task_id": e.task_id.hex(),
                "attempt": e.attempt_number,
                "name": e.task_info.name,
                "parent_task_id": e.task_info.parent_task_id.hex(),
                "node_id": su.node_id.hex() if su.node_id else None,
                "pid": su.worker_pid or None,
                "failed": bool(su.error_info.error_message),
            }
        )
    return rows


def scenario(out: Path) -> dict:
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_FAILURE_DETECTION,
            **_agent_ports(0),
        },
    )
    workers = [cluster.add_node(**WORKER, **_agent_ports(i)) for i in (1, 2, 3)]
    cluster.wait_for_nodes()
    mlflow_server = _start_mlflow(out)
    ray.init(address=cluster.address, log_to_driver=False)  # this process reads Ray's task records
    raylets = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n.node_id for n in workers}
    cluster_up_s = time.monotonic() - start

    log_path = out / "sweep.log"
    with open(log_path, "w") as log:
        sweep = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "--smoke-test",
                "--address",
                cluster.address,
                "--output",
                str(out / "sweep"),
                "tracking.uri=http://127.0.0.1:5000",
                *SWEEP_OVERRIDES,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    # Kill the node of the first trial that reaches its subset tasks (past its fine-tuning checkpoint).
    # The sweep's console (distlap/sweep/progress.py) names each trial's process once: "[<id>] runs in pid N".
    evaluating = re.compile(r"^\[(\w+)\] evaluating", re.MULTILINE)
    removed = None
    while removed is None and sweep.poll() is None and time.monotonic() - start < 400:
        text = log_path.read_text()
        match = evaluating.search(text)
        if match:
            trial_id = match.group(1)
            pid = int(re.findall(rf"^\[{trial_id}\] runs in pid (\d+)", text, re.MULTILINE)[-1])
            node_id = _node_of(pid, raylets)
            node = next(n for n in workers if n.node_id == node_id)
            time.sleep(1.0)  # let subset tasks start on it
            cluster.remove_node(node, allow_graceful=False)
            removed = {"node_id": node_id, "trial_id": trial_id, "pid": pid, "at_s": time.monotonic() - start}
        time.sleep(0.2)
    try:
        returncode = sweep.wait(timeout=max(10, 480 - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        sweep.kill()
        returncode = "timeout"
    time.sleep(2)  # task events reach the GCS about once a second
    report = {
        "returncode": returncode,
        "removed": removed,
        "worker_nodes": [n.node_id for n in workers],
        "head_node": cluster.head_node.node_id,
        "task_events": _task_events(),
        "cluster_up_s": cluster_up_s,
        "wall_s": time.monotonic() - start,
    }
    ray.shutdown()
    mlflow_server.terminate()
    mlflow_server.wait(timeout=30)
    (out / REPORT).write_text(json.dumps(report, indent=1))
    return report


def _bring_up_loopback() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


# --- the test --------------------------------------------------------------------------------------


def _namespace_prefix() -> list[str] | None:
    """``unshare`` into fresh network + PID + mount namespaces, as root or in a user namespace."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return None
    common = ["--net", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child"]  # all die with unshare
    for prefix in (["unshare", *common], ["unshare", "--user", "--map-root-user", *common]):
        probe = subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def _trial_pids(out: Path) -> dict[str, set[int]]:
    """Ray trial id -> the worker processes Tune recorded in the trial's result rows."""
    pids = collections.defaultdict(set)
    for result_file in (out / "ray_results").glob("*/*/result.json"):
        for line in result_file.read_text().splitlines():
            row = json.loads(line)
            pids[row["trial_id"]].add(row["pid"])
    return pids


@pytest.mark.slow
def test_sweep_spreads_over_nodes_and_survives_losing_one(tmp_path):
    from helpers import MLFLOW_SERVER_ENV  # not at the top: this file also runs as the scenario's script

    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip(
            "needs `unshare` (util-linux) and `ip` (iproute2) with network namespaces, so that "
            "the Ray cluster listens on a private loopback only"
        )
    # A short, private Ray temp dir: socket paths stay short, and no other Ray session sees this one.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dl-ray-", dir="/tmp"))
    out = tmp_path / "multinode"
    env = {**os.environ, **MLFLOW_SERVER_ENV, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, __file__, str(out)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.monotonic() - start
    sweep_log = (out / "sweep.log").read_text() if (out / "sweep.log").is_file() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + sweep_log[-3000:]
    report = json.loads((out / REPORT).read_text())
    print(
        f"multinode: cluster up {report['cluster_up_s']:.0f}s, scenario {report['wall_s']:.0f}s, "
        f"test {wall:.0f}s; node removed at {report['removed'] and report['removed']['at_s']:.0f}s"
    )
    assert report["returncode"] == 0, sweep_log[-4000:]
    removed = report["removed"]
    assert removed is not None, "no trial reached its subset tasks"

    # Where things ran, by Ray's records.
    sweep_out = out / "sweep"
    events = report["task_events"]
    node_of_pid = {e["pid"]: e["node_id"] for e in events if e["pid"] and e["node_id"]}
    trial_nodes = {
        tid: {node_of_pid.get(pid) for pid in pids} for tid, pids in _trial_pids(sweep_out).items()
    }
    assert len(trial_nodes) == N_TRIALS
    assert len(set().union(*trial_nodes.values())) >= 2, trial_nodes  # trials on several nodes
    assert report["head_node"] not in set().union(*trial_nodes.values())  # the head has no GPU
    subset_nodes = {e["node_id"] for e in events if e["name"] == "_subset_task" and e["node_id"]}
    assert len(subset_nodes) >= 2, subset_nodes  # subset tasks too
    # The killed trial ran on the removed node, then again on another one, resuming from its checkpoint.
    assert removed["node_id"] in trial_nodes[removed["trial_id"]]
    assert trial_nodes[removed["trial_id"]] - {removed["node_id"]}, trial_nodes
    assert f"[{removed['trial_id']}] stage: restored the fine-tuned adapter" in sweep_log
    assert sweep_log.count(f"[{removed['trial_id']}] stage: fine-tuning") == 1

    # Every result in the one MLflow store and the one Optuna study; nothing lost, nothing doubled.
    summary_rows = (sweep_out / "summary.csv").read_text().splitlines()[1:]
    assert len(summary_rows) == N_TRIALS
    cfg_text = (sweep_out / "config.yaml").read_text()
    assert "uri: http://127.0.0.1:5000" in cfg_text
    study = optuna.load_study(study_name=sweep_out.name, storage=f"sqlite:///{sweep_out / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * N_TRIALS
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distlap-layerwise")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    kinds = collections.Counter(r.data.tags["distlap.kind"] for r in runs)
    assert kinds == {"sweep": 1, "trial": N_TRIALS, "subset": N_TRIALS * N_SUBSETS}, kinds
    assert all(r.info.status == "FINISHED" for r in runs)
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags["distlap.kind"] == "trial"}
    for t in study.trials:
        run = trial_runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.metrics["bayes/val/nll"] == pytest.approx(t.value)
    subsets_per_trial = collections.Counter(
        r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags["distlap.kind"] == "subset"
    )
    assert set(subsets_per_trial.values()) == {N_SUBSETS} and set(subsets_per_trial) == set(trial_runs)
    # Artifacts went through the tracking server into its one artifact store.
    assert list((out / "mlartifacts").rglob("reliability_all.png"))


@pytest.mark.cluster
@pytest.mark.skipif(
    os.environ.get("DISTLAP_RAY_UP") != "1",
    reason="opt-in: DISTLAP_RAY_UP=1 (root; installs openssh-server and rsync, ~5 min)",
)
def test_ray_up_local_provider_runs_the_smoke_sweep(tmp_path):
    """`ray up` (local provider, SSH to loopback) -> the smoke sweep on the cluster's worker -> `ray down`,
    by tests/cluster/ray_up_smoke.sh; afterwards no Ray process of that cluster is left."""
    proc = subprocess.run(
        ["bash", str(ROOT / "tests" / "cluster" / "ray_up_smoke.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert re.search(r"0\.0/1\.0 GPU", log)  # the worker joined with its GPU
    assert "[sweep] objective bayes/val/nll" in log  # the sweep finished and summarised
    # Trials need a GPU: they ran on the worker the launcher brought up, not on the head.
    nodes = re.findall(r"node_ip \[([^\]]*)\] objective ([0-9.]+)", log)
    assert len(nodes) == 2 and all(ips == "'127.0.0.2'" for ips, _ in nodes), nodes
    assert "== no Ray process left" in log


if __name__ == "__main__":
    _bring_up_loopback()
    report = scenario(Path(sys.argv[1]))
    sys.exit(0 if report["returncode"] == 0 else 1)
