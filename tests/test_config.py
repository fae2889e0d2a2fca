import pytest

from distlap.config import ConfigError, TrialConfig, load_config, to_yaml


def test_embedded_default_is_tiny_backbone_on_downstream_classes():
    cfg = load_config()
    assert cfg.backbone.name == "distlap/vit-tiny-fmnist"
    assert cfg.data.dataset == "fashion_mnist"
    assert cfg.data.classes == [5, 6, 7, 8, 9]  # the classes the backbone was not pretrained on
    assert cfg == TrialConfig()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("peft:\n  method: norm\n  rank: 2\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=1"])
    assert (cfg.peft.method, cfg.peft.rank, cfg.train.epochs) == ("norm", 2, 1)
    assert (
        load_config(path.with_name("again.yaml").write_text(to_yaml(cfg)) and path.with_name("again.yaml"))
        == cfg
    )  # round trip


@pytest.mark.parametrize(
    "override, match",
    [
        ("peft.rank=-1", r"peft\.rank: .*greater than 0.*-1"),
        ("peft.method=prefix", r"peft\.method: .*'lora', 'norm' or 'hybrid'.*prefix"),
        ("train.prior_precision=0", r"train\.prior_precision: .*greater than 0"),
        ("peft.rnak=4", r"peft\.rnak: unknown setting"),
        ("data.val_fraction=1.5", r"data\.val_fraction"),
        ("data.classes=[3, 3]", r"data\.classes: .*distinct"),
        ("train.device=tpu", r"train\.device"),
        ("laplace.subsets={x: []}", r"subset 'x' = \[\]: name one or more distinct block indices"),
        ("laplace.subsets={x: [1, 1]}", r"subset 'x' = \[1, 1\]: name one or more distinct"),
        (
            ("laplace.hessian_structure=kron", "peft.method=norm"),
            r"laplace.hessian_structure=kron cannot cover LayerNorm parameters",
        ),
        ("train.prior_anchor=origin", r"train\.prior_anchor: .*'init' or 'zero'.*origin"),
        ("train.regime=laplace", r"train\.regime: .*'posthoc' or 'mode'.*laplace"),
        ("train.prior_precision=-3", r"train\.prior_precision: .*greater than 0.*-3"),
        ("train.refine_steps=-1", r"train\.refine_steps: .*greater than or equal to 0"),
        ("train.refine_to=1", r"train\.refine_to: .*less than 1"),
        (
            ("train.regime=mode", "train.refine_steps=50"),
            r"train.refine_steps=50 refines a posthoc theta-hat, but regime=mode .*set train.refine_steps=0",
        ),
    ],
)
def test_bad_values_name_field_and_value(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override] if isinstance(override, str) else list(override))


def test_tiny_backbone_refuses_other_data():
    with pytest.raises(ConfigError, match=r"pretrained on fashion_mnist.*cifar10.*hub or local backbone"):
        load_config(overrides=["data.dataset=cifar10"])
    cfg = load_config(overrides=["data.dataset=cifar10", "backbone.name=google/vit-base-patch16-224"])
    assert cfg.data.classes is None


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["ood.near_classes=[4,5]"], r"ood.near_classes \[4, 5\] overlap data.classes .* in \[5\]"),
        (
            ["backbone.name=some/hub-vit", "data.dataset=cifar10", "ood.near=true"],
            r"near-OOD .* needs data.classes",
        ),
        (["ood.far=svhn"], r"ood.far=svhn needs ood.svhn_path"),
        (
            ["shift.cifar10c_path=/nowhere/CIFAR-10-C"],
            r"shift.cifar10c_path='/nowhere/CIFAR-10-C' does not exist",
        ),
        (["shift.severities=[0,3]"], r"severities in 1..5"),
    ],
)
def test_protocol_settings_fail_before_work(overrides, match):
    """Bad shift / OOD settings are refused when the config loads, naming the field and the fix."""
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_near_ood_is_on_for_a_class_subset_only():
    assert load_config().ood.near is None  # auto: the default fine-tunes classes 5-9, near = 0-4
    cifar = load_config(overrides=["backbone.name=some/hub-vit", "data.dataset=cifar10"])
    assert cifar.data.classes is None and cifar.ood.near is None


def test_the_default_is_posthoc_with_the_init_anchor():
    """Laplace-LoRA's convention, measured: posthoc; LoRA A anchored at its initialisation."""
    train = load_config().train
    assert (train.regime, train.prior_anchor, train.refine_to) == ("posthoc", "init", 0.5)
    assert load_config(overrides=["train.regime=mode"]).train.regime == "mode"  # no refine setting: fine
    both = ["train.regime=mode", "train.refine_steps=0"]  # a config that set a budget, switched to mode
    assert load_config(overrides=both).train.refine_steps == 0
