"""Pretrain distlap's own tiny ViTs on the upstream classes and cache them as HF checkpoints.

``python -m distlap.finetune.pretrain distlap/vit-tiny-fmnist [--cache-dir DIR] [--force]`` builds one now;
otherwise the first :func:`distlap.finetune.backbones.load_backbone` of a tiny name does it. The result is a
``save_pretrained`` directory (config, weights, image processor) plus ``distlap_recipe.json``, loaded
afterwards exactly like a hub model.

The backbones of the current recipes ship with the package (``distlap/assets``, made by ``python -m
distlap.finetune.pretrain NAME --cache-dir distlap/assets --force``), so a fresh clone neither waits for
pretraining nor depends on the CPU it runs on; a changed recipe no longer matches the shipped hash and is
pretrained into the cache instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from distlap import metrics, names
from distlap.config import DataConfig, TrainConfig
from distlap.finetune.data import ImageTransform, load_splits, make_loader
from distlap.finetune.train import LogitsModel, fit_map
from distlap.runtime import predict, resolve_device, seed_everything, set_threads
from distlap.zoo import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TINY_BACKBONES, TinyRecipe

RECIPE_FILE = "distlap_recipe.json"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTLAP_CACHE", Path.home() / ".cache" / "distlap"))


def resolve(name: str, cache_dir: str | None = None, data_path: str | None = None) -> str:
    """Backbone name -> something ``from_pretrained`` accepts (building a tiny backbone if needed).

    A tiny backbone is pretrained on its upstream classes read from ``data_path`` (the task's own
    data directory; None = the default location); any other name is returned as it is.
    """
    if name not in TINY_BACKBONES:
        return name
    return str(
        ensure_tiny_backbone(name, Path(cache_dir) if cache_dir else default_cache_dir(), data_path=data_path)
    )


def cache_path(name: str, recipe: TinyRecipe, cache_dir: Path) -> Path:
    import transformers

    # The hash covers the recipe and the transformers major version (module names changed in 5.x).
    key = json.dumps([dataclasses.asdict(recipe), transformers.__version__.split(".")[0]], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_dir / "backbones" / f"{name.replace('/', '--')}-{digest}"


def ensure_tiny_backbone(
    name: str, cache_dir: Path, *, data_path: str | None = None, force: bool = False, log=print
) -> Path:
    """Path of the cached tiny backbone ``name``, pretraining it first if absent (process-safe)."""
    from filelock import FileLock

    recipe = TINY_BACKBONES[name]
    shipped = cache_path(name, recipe, ASSETS_DIR)
    if (shipped / RECIPE_FILE).is_file() and not force:
        return shipped
    target = cache_path(name, recipe, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent trials wait for one builder
        if (target / RECIPE_FILE).is_file() and not force:
            return target
        log(
            f"[distlap] pretraining tiny backbone {name} on {recipe.dataset} classes "
            f"{list(recipe.upstream_classes)} (once; cached in {target})"
        )
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            pretrain(recipe, Path(tmp) / "model", data_path=data_path, log=log)
            if target.exists():
                shutil.rmtree(target)
            (Path(tmp) / "model").rename(target)
    return target


def build_model(recipe: TinyRecipe):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        num_channels=recipe.num_channels,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.intermediate_size,
        num_labels=len(recipe.upstream_classes),
    )
    return ViTForImageClassification(config)


def pretrain(recipe: TinyRecipe, out_dir: Path, *, data_path: str | None = None, log=print) -> dict:
    """Train every weight of a fresh tiny ViT on the upstream classes; save it like a hub model."""
    seed_everything(recipe.seed)
    set_threads()
    device = resolve_device("auto")
    splits = load_splits(
        DataConfig(dataset=recipe.dataset, path=data_path, classes=list(recipe.upstream_classes)),
        seed=recipe.seed,
    )
    transform = ImageTransform(recipe.image_size, recipe.num_channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    model = build_model(recipe)
    train_cfg = TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr)
    loader = make_loader(splits.train, recipe.batch_size, shuffle=True, seed=recipe.seed, transform=transform)
    result = fit_map(
        LogitsModel(model),
        loader,
        None,
        train_cfg,
        device,
        on_epoch=lambda row, _: log(
            f"[distlap]   pretrain epoch {row['epoch']}: "
            f"loss {row[names.TRAIN_LOSS]:.3f} ({row[names.EPOCH_TIME]:.1f}s)"
        ),
    )
    if result.status != "ok":
        raise RuntimeError(f"pretraining {recipe} failed: {result.message}")
    val = make_loader(splits.val, 512, shuffle=False, seed=0, transform=transform)
    probs, labels = predict(LogitsModel(model), val, device)
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "upstream_val": metrics.summarize(probs, labels),
        "history": result.history,
    }
    log(f"[distlap]   upstream validation accuracy {summary['upstream_val']['accuracy']:.3f}")
    save(model, recipe, summary, out_dir)
    return summary


def save(model, recipe: TinyRecipe, summary: dict, out_dir: Path) -> None:
    """Like a hub model: ``save_pretrained`` weights and config, the image processor, and the recipe."""
    from transformers import ViTImageProcessor

    model.save_pretrained(out_dir)
    ViTImageProcessor(
        do_resize=False,
        size={"height": recipe.image_size, "width": recipe.image_size},
        image_mean=list(FASHION_MNIST_MEAN),
        image_std=list(FASHION_MNIST_STD),
    ).save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(TINY_BACKBONES))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    print(ensure_tiny_backbone(args.name, args.cache_dir or default_cache_dir(), force=args.force))


if __name__ == "__main__":
    main()
