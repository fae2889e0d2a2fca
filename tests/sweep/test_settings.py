from pathlib import Path

import pytest

from distlap.config import ConfigError
from distlap.sweep.settings import SweepConfig, load_sweep_config, max_concurrent, resolve, trial_config

CONFIGS = Path(__file__).resolve().parents[2] / "sweeps" / "configs"


def test_shipped_configs_load():
    default = load_sweep_config(CONFIGS / "default.yaml")
    assert default.search.num_samples >= 4
    assert set(default.search.space) == {"train.prior_precision", "peft.rank"}
    assert default.search.space["train.prior_precision"].kind == "loguniform"
    assert default.search.space["peft.rank"].kind == "choice"
    assert default.trial.backbone.name == "distlap/vit-tiny-fmnist"
    assert default.search.metric == "bayes/val/nll" and default.search.direction == "min"
    smoke = load_sweep_config(CONFIGS / "smoke.yaml")
    assert smoke.trial.backbone.name == "distlap/vit-mini-fmnist"
    vit = load_sweep_config(CONFIGS / "vit_b16_cifar100.yaml")
    assert (vit.trial.data.dataset, vit.trial.peft.rank, vit.trial.peft.alpha) == ("cifar100", 16, 16)
    assert (vit.trial.train.epochs, vit.trial.train.lr, vit.trial.laplace.n_samples) == (20, 1e-3, 30)
    assert vit.search.points_to_evaluate == [{"train.prior_precision": 1.0, "peft.rank": 16}]


def test_space_overrides_nest_merge_and_remove():
    cfg = load_sweep_config(
        CONFIGS / "default.yaml",
        [
            "search.space.peft.rank.values=[4, 8]",
            "search.space.train.lr={kind: loguniform, low: 1e-4, high: 1e-2}",
        ],
    )
    assert cfg.search.space["peft.rank"].values == [4, 8]
    assert cfg.search.space["train.prior_precision"].kind == "loguniform"  # kept from the file
    assert cfg.search.space["train.lr"].low == 1e-4
    cfg = load_sweep_config(CONFIGS / "default.yaml", ["search.space.peft=null"])
    assert set(cfg.search.space) == {"train.prior_precision"}


def test_trial_config_applies_searched_params():
    cfg = load_sweep_config(CONFIGS / "default.yaml")
    trial = trial_config(cfg, {"train.prior_precision": 12.5, "peft.rank": 4}, output_dir="/tmp/x")
    assert (trial.train.prior_precision, trial.peft.rank, trial.output_dir) == (12.5, 4, "/tmp/x")
    assert trial.data.max_train == cfg.trial.data.max_train


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "search.space.peft.rank.values=[0, 4]",
            r"search\.space\.peft\.rank: value 0 .*peft\.rank: .*greater than 0",
        ),
        (
            "search.space.peft.rnak={kind: choice, values: [2]}",
            r"search\.space\.peft\.rnak: .*unknown setting",
        ),
        ("search.space.train.prior_precision.low=0", r"search\.space\.train\.prior_precision: .*low > 0"),
        ("search.space.train.prior_precision.kind=choice", r"kind=choice needs a non-empty `values`"),
        ("search.space=null", r"search\.space: .*valid dictionary"),
        ("search.space={peft: null, train: null}", r"search\.space: .*at least one trial setting"),
        (
            "search.metric=bayes/test/nll",
            r"search\.metric: 'bayes/test/nll' is not a validation-split objective",
        ),
        ("search.num_sampels=4", r"search\.num_sampels: unknown setting"),
        ("search.num_samples=0", r"search\.num_samples: .*greater than 0"),
        ("search.points_to_evaluate=[{peft.rank: 4}]", r"search\.points_to_evaluate\[0\]: keys"),
        (
            "search.points_to_evaluate=[{peft.rank: 0, train.prior_precision: 1}]",
            r"search\.points_to_evaluate\[0\]: peft\.rank",
        ),
        ("resources.eval_tasks=2", None),  # glm: each Jacobian pass in two shards
        (
            "resources.eval_tasks=201",
            r"resources\.eval_tasks=201: more glm shards than the 200 examples .*trial\.data\.max_val",
        ),
        ("resources.cpus_per_eval_task=0", None),  # valid while eval_tasks=0
        ("trial.peft.rank=-1", r"trial\.peft\.rank: .*greater than 0"),
        ("trial.output_dir=/tmp/t", r"trial\.output_dir: set the sweep's output_dir"),
        ("name=a b", r"name: .*letters, digits"),
    ],
)
def test_bad_settings_name_the_field(override, match):
    if match is None:
        load_sweep_config(CONFIGS / "default.yaml", [override])
        return
    with pytest.raises(ConfigError, match=match):
        load_sweep_config(CONFIGS / "default.yaml", [override])


def test_cross_field_resource_errors():
    with pytest.raises(ConfigError, match=r"resources: .*eval_tasks > 0 needs"):
        load_sweep_config(overrides=["resources.eval_tasks=2", "resources.cpus_per_eval_task=0"])
    load_sweep_config(overrides=["resources.eval_tasks=2", "trial.laplace.predictive=glm"])  # shards


def test_more_glm_shards_than_examples_are_refused_naming_the_field():
    """Static caps here (the real splits' sizes in preflight); nn subsets are not shards of the data."""
    small = ["trial.data.max_test=5", "trial.ood.far=none", "trial.ood.near=false"]
    with pytest.raises(ConfigError, match=r"resources\.eval_tasks=6: .* 5 examples .*trial\.data\.max_test"):
        load_sweep_config(overrides=[*small, "resources.eval_tasks=6"])
    load_sweep_config(overrides=[*small, "resources.eval_tasks=5"])
    load_sweep_config(overrides=[*small, "resources.eval_tasks=6", "trial.laplace.predictive=nn"])
    with pytest.raises(ConfigError, match=r"resources\.eval_tasks=501: .*trial\.ood\.max_examples"):
        load_sweep_config(overrides=["resources.eval_tasks=501"])


def test_a_gpu_fraction_on_a_cluster_without_gpus_is_refused_naming_the_field():
    cfg = load_sweep_config(overrides=["resources.eval_tasks=2", "resources.gpus_per_eval_task=0.25"])
    no_gpus = r"resources\.gpus_per_eval_task=0\.25: the Ray cluster has no GPUs"
    with pytest.raises(ConfigError, match=no_gpus):
        max_concurrent(cfg, {"CPU": 16.0})
    assert max_concurrent(cfg, {"CPU": 16.0, "GPU": 1.0}) >= 1


def test_resolve_makes_everything_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve(SweepConfig(name="s"), now=0)
    out = Path(cfg.output_dir)
    assert out.is_absolute() and out.parent == tmp_path / "runs" and out.name.startswith("s-19")
    assert cfg.tracking.uri == f"sqlite:///{out}/mlflow.db" and cfg.tracking.uri.startswith("sqlite:////")
    assert cfg.search.storage == f"sqlite:///{out}/optuna.db"
    assert cfg.search.study_name == out.name
    given = resolve(
        SweepConfig(output_dir="rel", tracking={"uri": "http://head:5000"}, search={"study_name": "mine"})
    )
    assert given.output_dir == str(tmp_path / "rel")
    assert (given.tracking.uri, given.search.study_name) == ("http://head:5000", "mine")


def test_bundles_fit_the_subset_tasks_exactly():
    """Subset tasks are captured in the trial's placement group: each must fit one child bundle and
    never need the trial's own bundle, so k tasks run in k child bundles and nothing waits forever."""
    cfg = load_sweep_config(CONFIGS / "vit_b16_cifar100.yaml")
    own, *children = cfg.resources.bundles()
    assert own == {"CPU": 4, "GPU": 0.5} and len(children) == cfg.resources.eval_tasks == 4
    task = cfg.resources.task_resources()
    assert all(b == {"CPU": task["num_cpus"], "GPU": task["num_gpus"]} for b in children)
    assert cfg.resources.per_trial() == {"CPU": 8, "GPU": 1}  # one GPU, shared by fit and subset tasks
    local = load_sweep_config(CONFIGS / "default.yaml")
    assert local.resources.bundles() == [{"CPU": 1}]  # subsets in-process: no child bundles


def test_concurrency_follows_the_cluster():
    cfg = load_sweep_config(CONFIGS / "default.yaml")
    assert max_concurrent(cfg, {"CPU": 2.0}) == 2
    assert max_concurrent(cfg, {"CPU": 64.0}) == cfg.search.num_samples
    assert (
        max_concurrent(
            load_sweep_config(CONFIGS / "default.yaml", ["resources.max_concurrent=1"]), {"CPU": 2.0}
        )
        == 1
    )
    vit = load_sweep_config(CONFIGS / "vit_b16_cifar100.yaml")
    assert max_concurrent(vit, {"CPU": 64.0, "GPU": 8.0}) == 8
    assert max_concurrent(vit, {"CPU": 64.0, "GPU": 3.0}) == 3
    with pytest.raises(ConfigError, match=r"one trial needs 8 CPUs and 1 GPUs .* has 2 CPUs and 0 GPUs"):
        max_concurrent(vit, {"CPU": 2.0})


# --- kind=peft_methods: a grid over named settings -------------------------------------------------


def test_peft_methods_configs_are_full_grids():
    for name, size, settings in (
        ("peft_methods", 18, 2),
        ("peft_methods_smoke", 6, 2),
        ("peft_methods_cluster", 27, 3),
    ):
        cfg = load_sweep_config(CONFIGS / f"{name}.yaml")
        assert (cfg.kind, cfg.search.sampler, cfg.laplace) == ("peft_methods", "grid", True)
        assert cfg.search.num_samples == size == cfg.search.grid_size
        assert cfg.search.space["peft.method"].values == ["norm", "lora", "hybrid"]
        assert len(cfg.settings) == settings and cfg.tracking.experiment == "distlap-peft-methods"
        assert cfg.name.startswith("peft_methods")
    seed_settings = {
        (t.backbone.name, t.data.dataset, t.train.epochs)
        for t in (trial_config(cfg, {"setting": s, "peft.method": "norm", "seed": 0}) for s in cfg.settings)
    }
    assert seed_settings == {
        ("facebook/deit-tiny-patch16-224", "cifar10", 1),
        ("facebook/deit-tiny-patch16-224", "cifar100", 5),
        ("facebook/deit-small-patch16-224", "cifar100", 10),
    }


def test_settings_apply_before_searched_params_and_rederive_classes():
    cfg = load_sweep_config(CONFIGS / "peft_methods_cluster.yaml")
    trial = trial_config(cfg, {"setting": "vit_tiny_cifar100", "peft.method": "hybrid", "seed": 2})
    assert (trial.peft.method, trial.seed, trial.train.epochs, trial.peft.rank) == ("hybrid", 2, 5, 16)
    assert trial.data.classes is None  # all 100 classes, not the tiny default backbone's 5..9
    default = load_sweep_config(CONFIGS / "peft_methods.yaml")
    mini = trial_config(default, {"setting": "vit_mini_fmnist", "peft.method": "lora", "seed": 1})
    assert (mini.backbone.name, mini.data.classes, mini.data.max_train) == (
        "distlap/vit-mini-fmnist",
        [5, 6, 7, 8, 9],
        5000,
    )
    kept = load_sweep_config(CONFIGS / "peft_methods.yaml", ["trial.data.classes=[5, 6]"])
    assert trial_config(
        kept, {"setting": "vit_mini_fmnist", "peft.method": "lora", "seed": 0}
    ).data.classes == [5, 6]  # chosen by the user: kept


@pytest.mark.parametrize(
    "override, match",
    [
        ("search.num_samples=5", r"search\.num_samples=5 but the grid has 18 points"),
        (
            "search.space.train={prior_precision: {kind: loguniform, low: 1, high: 10}}",
            r"sampler=grid needs kind=choice for every setting; train\.prior_precision",
        ),
        (
            "search.space.setting.values=[vit_tiny_fmnist, vit_huge]",
            r"search\.space\.setting: \['vit_huge'\] not among",
        ),
        (
            "settings.vit_mini_fmnist.peft.rank=0",
            r"search\.space\.setting: value 'vit_mini_fmnist' .*peft\.rank",
        ),
        ("search.space.setting=null", r"settings: named but never used"),
        ("laplace=false;search.metric=bayes/val/nll", r"kind=peft_methods without laplace=true has only map"),
    ],
)
def test_bad_peft_methods_settings_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep_config(CONFIGS / "peft_methods.yaml", override.split(";"))


def test_laplace_flag_belongs_to_peft_methods():
    assert not load_sweep_config(CONFIGS / "peft_methods.yaml", ["laplace=false"]).laplace  # MAP objective
    with pytest.raises(ConfigError, match=r"laplace: only for kind=peft_methods"):
        load_sweep_config(CONFIGS / "default.yaml", ["laplace=true"])
