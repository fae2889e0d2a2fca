"""Checks before a sweep writes anything or starts Ray: its inputs and its cost.

:func:`check_inputs` loads, once, every data set and backbone a trial of the sweep can use (the base
trial and each searched value), so a missing data set or a corrupt or unreadable backbone fails here with
the setting and the fix named, instead of inside every trial after Ray has started (and, with glm
evaluation tasks, a split with fewer examples than ``resources.eval_tasks`` shards). :func:`check_cost`
estimates what the settings ask for: fine-tuning steps per trial (on CPU, timed: one training step is
measured here) and the memory of the posterior samples. An estimate no machine could meet (``epochs`` of
10^9, samples larger than memory) is refused with the estimate; a long one is announced. Both raise
:class:`~distlap.config.ConfigError` (exit code 2).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass

from distlap.config import ConfigError, TrialConfig
from distlap.finetune.backbones import BackboneError, load_backbone
from distlap.finetune.data import DataError, load_splits
from distlap.sweep.settings import SweepConfig, shard_problems, trial_config

MAX_TRIAL_DAYS = 30  # a single trial's fine-tuning beyond this is refused as a mistake
MAX_STEPS = 10**8  # training steps of one trial beyond this are refused (GPU trials are not timed here)
WARN_SWEEP_HOURS = 12
# laplace-torch draws every posterior sample at once: n_samples x parameters floats, and a copy.
_SAMPLE_COPIES = 2
# An HTTP/2 client preface and an empty SETTINGS frame: every gRPC server (Ray's GCS, Ray Client's
# server) answers with a SETTINGS frame (type 0x04); anything else is not Ray.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
ADDRESS_TIMEOUT_S = 5.0


class AddressError(ConfigError):
    """``--address`` names no Ray cluster; the message says what answered and what to pass."""


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail within seconds on a HOST:PORT nobody listens on, or where something other than Ray answers
    (Ray itself retries such an address for minutes)."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    expected = (
        "expected ray://HEAD:10001 (Ray Client) or HEAD:6379 (on a cluster node), or auto; from outside "
        "the cluster, run the driver on the head (README, 'On a cluster')"
    )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(_HTTP2_PREFACE)
            head = _read(conn, 9)
    except (OSError, ValueError) as err:
        raise AddressError(
            f"cannot reach the Ray cluster at --address {address!r} ({err}); {expected}"
        ) from None
    if len(head) < 9 or head[3] != 4:
        raise AddressError(
            f"cannot reach the Ray cluster at --address {address!r}: something answers there, but not "
            f"Ray (its first bytes: {head[:16]!r}); {expected}"
        )


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass(frozen=True)
class Variant:
    """One trial the sweep can run, as far as inputs go: where it comes from, and its settings."""

    origin: str
    trial: TrialConfig


@dataclass
class Inputs:
    """What the estimates need, per variant (by origin): training examples and tuned parameters; and
    the base trial's data and backbone, to time a step."""

    n_train: dict[str, int]
    tuned: dict[str, int]
    base: tuple | None = None  # (splits, (backbone, transform))


def variants(cfg: SweepConfig) -> list[Variant]:
    """The base trial and one trial per searched value (both ends of a range, every choice)."""
    out = [Variant("trial", cfg.trial)]
    for name, param in cfg.search.space.items():
        for value in param.ends():
            out.append(Variant(f"search.space.{name}={value!r}", trial_config(cfg, {name: value})))
    return out


def check_inputs(cfg: SweepConfig, log=print) -> Inputs:
    """Load every distinct data set and backbone (with its PEFT method) of the sweep; ConfigError names
    the setting that brought in the one that failed."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the driver's terminal shows distlap's lines, not download bars
    splits, models, counts, inputs = {}, {}, {}, Inputs({}, {})
    for v in variants(cfg):
        data_key = json.dumps([v.trial.data.model_dump(), v.trial.seed])
        try:
            if data_key not in splits:
                splits[data_key] = load_splits(v.trial.data, seed=v.trial.seed)
            split = splits[data_key]
            model_key = json.dumps([v.trial.backbone.model_dump(), v.trial.data.path, split.num_classes])
            if model_key not in models:
                models[model_key] = _backbone(v.trial, split.num_classes)
        except (DataError, BackboneError) as err:
            raise ConfigError(f"invalid input ({v.origin}):\n  {err}") from None
        peft_key = json.dumps([model_key, v.trial.peft.model_dump()])
        if peft_key not in counts:
            counts[peft_key] = _tuned(models[model_key][0], v.trial)
        inputs.n_train[v.origin], inputs.tuned[v.origin] = len(split.train), counts[peft_key]
        _check_shards(cfg, v, split)
        if inputs.base is None:
            inputs.base = (split, models[model_key])
    log(f"[sweep] inputs checked: {len(splits)} data set(s) and {len(models)} backbone(s) load")
    return inputs


def _check_shards(cfg: SweepConfig, v: Variant, split) -> None:
    """glm eval tasks: no more shards than the examples of ``v``'s smallest evaluation split."""
    sizes = {"validation split": len(split.val), "test split": len(split.test)}
    problems = shard_problems(cfg, v.trial, sizes, v.origin)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _backbone(trial: TrialConfig, num_classes: int):
    return load_backbone(
        trial.backbone.name,
        num_classes,
        cache_dir=trial.backbone.cache_dir,
        seed=trial.seed,
        data_path=trial.data.path,
    )


def _tuned(backbone, trial: TrialConfig) -> int:
    """Trainable parameters of ``trial``'s PEFT method on a copy of ``backbone``."""
    import copy

    from distlap.finetune.adapters import apply_peft, tuned_params

    return tuned_params(apply_peft(copy.deepcopy(backbone), trial.peft)).trainable


def check_cost(cfg: SweepConfig, inputs: Inputs, memory_bytes: float, concurrency: int, log=print) -> None:
    """Refuse settings no machine could run (with the estimate), announce long ones."""
    problems = _memory_problems(cfg, inputs, memory_bytes)
    steps = {o: cfg_steps(_trial_of(cfg, o), n) for o, n in inputs.n_train.items()}
    origin = max(steps, key=steps.get)
    worst = steps[origin]
    step_s = _step_seconds(cfg, *inputs.base) if cfg.resources.gpus_per_trial == 0 and inputs.base else None
    if worst > MAX_STEPS or (step_s is not None and worst * step_s > MAX_TRIAL_DAYS * 86400):
        timed = f", about {_duration(worst * step_s)} on these CPUs" if step_s else ""
        problems.append(
            f"trial.train.epochs={_trial_of(cfg, origin).train.epochs} ({origin}): {worst:,} training steps "
            f"per trial{timed}; lower trial.train.epochs (or data.max_train)"
        )
    if problems:
        raise ConfigError("settings beyond any machine:\n  " + "\n  ".join(problems))
    if step_s is not None:
        total = sum(steps.values()) / len(steps) * step_s * cfg.search.num_samples / max(concurrency, 1)
        if total > WARN_SWEEP_HOURS * 3600:
            log(
                f"[sweep] warning: fine-tuning alone will take about {_duration(total)} "
                f"({cfg.search.num_samples} trials, {concurrency} at once, {step_s * 1e3:.0f} ms a step)"
            )


def cfg_steps(trial: TrialConfig, n_train: int) -> int:
    return trial.train.epochs * math.ceil(n_train / trial.train.batch_size)


def _trial_of(cfg: SweepConfig, origin: str) -> TrialConfig:
    return next(v.trial for v in variants(cfg) if v.origin == origin)


def _memory_problems(cfg: SweepConfig, inputs: Inputs, memory_bytes: float) -> list[str]:
    problems = []
    for origin, params in inputs.tuned.items():
        trial = _trial_of(cfg, origin)
        need = _SAMPLE_COPIES * 4 * trial.laplace.n_samples * params
        if need > memory_bytes:
            problems.append(
                f"trial.laplace.n_samples={trial.laplace.n_samples} ({origin}): the posterior samples "
                f"of {params:,} parameters take about {need / 2**30:.1f} GiB, more than the "
                f"{memory_bytes / 2**30:.1f} GiB of memory a trial can have; lower it"
            )
    return problems


def _step_seconds(cfg: SweepConfig, splits, loaded) -> float:
    """One timed fine-tuning step (forward, backward) of the base trial on this machine's CPU."""
    import copy

    import torch
    import torch.nn.functional as F

    from distlap.finetune.adapters import apply_peft
    from distlap.finetune.train import LogitsModel

    trial, (backbone, transform) = cfg.trial, loaded
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    try:
        model = LogitsModel(apply_peft(copy.deepcopy(backbone), trial.peft)).train()
        n = min(trial.train.batch_size, len(splits.train))
        x, y = transform(splits.train.tensors[0][:n]), splits.train.tensors[1][:n]
        times = []
        for _ in range(2):  # the first step warms up
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - start)
        return times[-1]
    finally:
        torch.set_num_threads(threads)


def machine_memory() -> float:
    """Physical memory of this machine, in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s"
