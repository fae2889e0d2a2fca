"""cluster.yaml and the cluster sweep config, validated offline the way `ray up` validates them.

`ray up` runs ``prepare_config`` (merge with the provider's defaults) and ``validate_config`` (Ray's
``ray-schema.json`` plus its own checks) before it contacts the cloud; this does the same, and checks
what the schema leaves open: provider keys against the schema's documented ones, each AWS node_config
against botocore's own EC2 RunInstances model (Ray passes it to ``create_instances``), and the promises
cluster.yaml makes in its comments (only SSH open, pinned image, the sweep config fits the node types).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from distlap import names
from distlap.sweep.settings import load_sweep_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
LOCAL_CLUSTER = ROOT / "tests" / "cluster" / "local_cluster.yaml"
CONFIGS = ROOT / "sweeps" / "configs"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_up_validate(config: dict) -> dict:
    """What `ray up` checks before it starts any node; raises on a bad config."""
    config = copy.deepcopy(config)
    schema = json.loads(SCHEMA.read_text())
    unknown = set(config.get("provider", {})) - set(schema["properties"]["provider"]["properties"])
    if unknown:  # the schema lets provider keys through; a misspelt one would silently do nothing
        raise ValueError(f"provider: unknown keys {sorted(unknown)}")
    prepared = prepare_config(config)
    validate_config(prepared)
    if prepared["provider"]["type"] == "aws":
        _validate_ec2_node_configs(prepared)
    return prepared


def _validate_ec2_node_configs(config: dict) -> None:
    import botocore.session
    from botocore.validate import validate_parameters

    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node_type in config["available_node_types"].items():
        try:
            validate_parameters(
                {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, run_instances.input_shape
            )
        except Exception as err:  # noqa: BLE001 - botocore raises several validation types
            raise ValueError(f"available_node_types.{name}.node_config: {err}") from None


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER)


def test_cluster_yaml_passes_rays_own_validation(cluster):
    prepared = ray_up_validate(cluster)
    assert prepared["head_node_type"] == "head"
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != "head"}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert {v["resources"]["GPU"] for v in workers.values()} == {1, 4}  # 1-GPU and 4-GPU instances
    assert all(0 <= v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) >= prepared["max_workers"]


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("setup_comands",), ["true"], "setup_comands"),  # top-level key
        (("available_node_types", "gpu1", "min_worker"), 1, "min_worker"),  # node-type key
        (("available_node_types", "gpu1", "resources", "GPU"), 0.5, "0.5"),  # wrong type
        (("available_node_types", "gpu4", "node_config", "InstanceTyp"), "g5.12xlarge", "InstanceTyp"),
        (
            ("available_node_types", "gpu1", "node_config", "InstanceMarketOptions", "MarketTyp"),
            "spot",
            "MarketTyp",
        ),
        (("provider", "regoin"), "us-east-1", "regoin"),
        (("docker", "imgae"), "rayproject/ray:2.60.0-py311-gpu", "imgae"),
        (("auth", "ssh_usr"), "ubuntu", "ssh_usr"),
        (("head_node_type",), "haed", "head_node_type"),
    ],
)
def test_a_typo_fails_validation(cluster, path, value, message):
    bad = copy.deepcopy(cluster)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(Exception, match=re.escape(message)):
        ray_up_validate(bad)


def test_the_cluster_is_closed_to_strangers(cluster):
    """Every node type names the security group made once by hand (cluster.yaml, step 2: all traffic
    between members, SSH from ADMIN_CIDR): Ray's launcher then makes no group of its own, and the group
    it would make opens SSH to 0.0.0.0/0 (checked with Ray's own code, no AWS call). Nothing on the head
    listens beyond 127.0.0.1 but PostgreSQL, which admits password (SCRAM) logins only."""
    from ray.autoscaler._private.aws.config import _configure_security_group, _create_default_inbound_rules

    world_ssh = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert world_ssh in _create_default_inbound_rules(set())  # what Ray's own group would admit
    prepared = ray_up_validate(cluster)
    groups = [t["node_config"].get("SecurityGroupIds") for t in prepared["available_node_types"].values()]
    assert all(g and all(re.fullmatch(r"sg-[0-9a-f]{8,17}", x) for x in g) for g in groups), groups
    assert _configure_security_group(copy.deepcopy(prepared)) == prepared  # Ray keeps ours, makes none
    assert "security_group" not in cluster["provider"]
    text = CLUSTER.read_text()
    assert "--cidr ADMIN_CIDR" in text and "--source-group $SG" in text
    commands = " ".join(cluster["head_setup_commands"] + cluster["head_start_ray_commands"])
    assert "0.0.0.0" not in commands.replace("0.0.0.0/0 scram-sha-256", "")  # nothing open without auth
    assert "--dashboard-host=127.0.0.1" in commands
    assert re.search(r"optuna-dashboard .*--host 127\.0\.0\.1", commands)
    assert re.search(r"mlflow server .*--host 127\.0\.0\.1", commands)
    assert "-A scram-sha-256" in commands and "host all distlap 0.0.0.0/0 scram-sha-256" in commands
    assert " trust" not in commands


def test_the_shared_folder_is_not_world_writable_and_secrets_stay_out_of_configs(cluster):
    """--resume unpickles a sweep folder's state: distlap's EFS folder belongs to the containers' user
    alone. The database password is made on the head into a 0600 file that PGPASSFILE names."""
    text = " ".join(cluster["initialization_commands"] + cluster["setup_commands"])
    assert "1777" not in text and "777" not in text and "o+w" not in text
    assert "chown 1000:100 /mnt/efs/distlap && sudo chmod 0750 /mnt/efs/distlap" in text
    assert "--env=PGPASSFILE=/mnt/efs/distlap/secrets/pgpass" in cluster["docker"]["run_options"]
    assert "umask 077" in " ".join(cluster["head_setup_commands"])


PINNED = re.compile(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}")


def image_is_pinned(image: str) -> bool:
    """``name:tag@sha256:<64 hex>``: a tag alone can be moved to other contents."""
    return PINNED.fullmatch(image) is not None


def test_image_is_pinned_by_digest(cluster):
    """A tag-only image is refused here; the all-zero placeholder digest is refused by `ray up` itself
    (the first command on each host), until step 4 of cluster.yaml puts the real digest in."""
    image = cluster["docker"]["image"]
    assert image_is_pinned(image), f"docker.image {image!r}: pin it by digest (cluster.yaml, step 4)"
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-gpu@")  # Ray and Python as pinned
    assert not image_is_pinned("rayproject/ray:2.60.0-py311-gpu")
    assert not image_is_pinned("rayproject/ray@sha256:1234")
    guard = cluster["initialization_commands"][0]
    assert f'case "{image}"' in guard and "exit 1" in guard
    placeholder = image.endswith("@sha256:" + "0" * 64)
    result = subprocess.run(["sh", "-c", guard], capture_output=True, text=True)
    assert (result.returncode != 0) == placeholder and ("placeholder" in result.stderr) == placeholder
    real = guard.replace(image, image[:-64] + "ab" * 32, 1)
    assert subprocess.run(["sh", "-c", real]).returncode == 0


def test_installs_are_pinned(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert 'pip install -q -e "/home/ray/distlap[postgres]"' in setup  # pyproject.toml's pins, nothing else
    assert cluster["file_mounts"] == {"/home/ray/distlap": "."}
    assert all(
        re.search(r"pip install .*==", c) for c in cluster["head_setup_commands"] if "pip install" in c
    )


@pytest.mark.parametrize("config", ["vit_b16_cifar100_cluster.yaml", "peft_methods_cluster.yaml"])
def test_cluster_sweep_config_fits_the_cluster(cluster, config):
    cfg = load_sweep_config(CONFIGS / config)
    per_trial = cfg.resources.per_trial()
    node_types = cluster["available_node_types"]
    for name in ("gpu1", "gpu4"):
        capacity = node_types[name]["resources"]
        # Whole trials per node, no GPU left over: a trial's bundles fit one node (PACK) exactly.
        trials = capacity["GPU"] / per_trial["GPU"]
        assert trials == int(trials) >= 1 and per_trial["CPU"] * trials <= capacity["CPU"], name
    assert node_types["head"]["resources"] == {"CPU": 0}
    if cfg.kind == "layerwise":  # the subset tasks share the trial's GPU
        assert cfg.resources.eval_tasks > 0 and 0 < cfg.resources.gpus_per_eval_task < 1
    # Shared storage for files; MLflow and Optuna in the head's PostgreSQL (no SQLite on NFS), whose
    # databases the head makes and whose Optuna database the head's dashboard shows.
    shared = "/mnt/efs"
    assert f"--volume={shared}:{shared}" in cluster["docker"]["run_options"]
    assert cfg.output_dir.startswith(shared + "/") and cfg.tracking.artifacts.startswith(shared + "/")
    head = "postgresql+psycopg://distlap@distlap-head:5432/"
    assert (cfg.tracking.uri, cfg.search.storage) == (head + "mlflow", head + "optuna")
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "for db in mlflow optuna" in head_start and "CREATE DATABASE $db" in head_start
    assert "optuna-dashboard postgresql+psycopg://distlap@127.0.0.1:5432/optuna" in head_start
    assert "distlap-head" in " ".join(cluster["head_setup_commands"] + cluster["worker_setup_commands"])
    assert cfg.max_failures >= 1  # spot workers


def test_cluster_sweep_is_the_seed_experiment():
    """The cluster config changes where and how the sweep runs, never what it computes."""
    local = load_sweep_config(CONFIGS / "vit_b16_cifar100.yaml")
    on_cluster = load_sweep_config(CONFIGS / "vit_b16_cifar100_cluster.yaml")
    assert on_cluster.trial == local.trial
    keep = {"space", "metric", "mode", "num_samples", "seed", "points_to_evaluate"}
    assert on_cluster.search.model_dump(include=keep) == local.search.model_dump(include=keep)
    assert on_cluster.name == local.name


def test_local_provider_config_passes_validation():
    prepared = ray_up_validate(_load(LOCAL_CLUSTER))
    assert prepared["provider"]["head_ip"] == "127.0.0.1"
    assert all(ip.startswith("127.") for ip in prepared["provider"]["worker_ips"])  # loopback only
    assert not any(c.strip().startswith("ray stop") for c in prepared["worker_start_ray_commands"])


def tiny_overrides(out: Path, fmnist_dir: Path) -> list[str]:
    """What a CPU dry run changes in the cluster config: the model and data shrink to distlap's registry
    tiny ViT on (fake) Fashion-MNIST, resources to this machine's 2 CPUs (one trial, one subset task),
    stores to local SQLite, fewer bootstrap, shift and OOD examples. The Laplace and search settings
    (estimator, samples, sample sets, predictive, prior, rank, lr) stay the config's."""
    return [
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        f"search.storage=sqlite:///{out / 'optuna.db'}",
        "search.num_samples=1",
        "resources.cpus_per_trial=1",
        "resources.gpus_per_trial=0",
        "resources.eval_tasks=1",
        "resources.cpus_per_eval_task=1",
        "resources.gpus_per_eval_task=0",
        "resources.max_concurrent=1",
        "trial.backbone.name=distlap/vit-tiny-fmnist",
        "trial.data.dataset=fashion_mnist",
        f"trial.data.path={fmnist_dir}",
        "trial.data.max_train=200",
        "trial.data.max_val=60",
        "trial.data.max_test=60",
        "trial.train.epochs=1",
        "trial.train.refine_steps=3",
        "trial.laplace.fit_examples=64",
        "trial.laplace.n_bootstrap=50",
        "trial.shift.corruptions=[gaussian_noise]",
        "trial.shift.severities=[3]",
        "trial.shift.max_examples=30",
        "trial.ood.max_examples=30",
    ]


@pytest.mark.slow
def test_cluster_config_dry_run_on_cpu_at_tiny_scale(tmp_path, fake_fmnist_dir):
    """`python sweeps/layerwise.py --config vit_b16_cifar100_cluster.yaml` with tiny_overrides: one Ray
    Tune trial fine-tunes, fits the config's Laplace (Monte-Carlo GGN), evaluates every subset with the
    nn predictive (30 samples x 3 sets) as a Ray subset task in a child bundle, logs to MLflow and
    Optuna, and records the settings it ran with."""
    out = tmp_path / "dry"
    argv = ["--config", str(CONFIGS / "vit_b16_cifar100_cluster.yaml"), "--output", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "layerwise.py"), *argv, *tiny_overrides(out, fake_fmnist_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's distlap
    )
    assert run.returncode == 0, run.stderr[-3000:]
    saved = load_sweep_config(out / "config.yaml")
    cluster = load_sweep_config(CONFIGS / "vit_b16_cifar100_cluster.yaml")
    assert saved.trial.laplace.model_dump(
        exclude={"fit_examples", "n_bootstrap"}
    ) == cluster.trial.laplace.model_dump(exclude={"fit_examples", "n_bootstrap"})
    (result_file,) = (out / "trials").glob("*/layer_wise_results.json")
    result = json.loads(result_file.read_text())
    assert result[names.ESTIMATOR] == "mc" and result[names.PREDICTIVE] == "nn"
    assert result[names.N_SAMPLES] == 30 and len(result["subsets"]) == 10  # 6 blocks + 3 groups + all
    assert "as Ray tasks" in run.stdout + run.stderr  # the subsets ran in the trial's child bundle
