"""Before a sweep writes anything: its inputs load, its cost is possible, its --address is Ray."""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
import time
from concurrent import futures

import pytest

from distlap.config import ConfigError
from distlap.sweep import preflight
from distlap.sweep.settings import load_sweep_config

SMALL = ["trial.data.max_train=64", "trial.data.max_val=32", "trial.data.max_test=32"]


def _cfg(fake_fmnist_dir, tiny_vit_dir, *overrides):
    return load_sweep_config(
        overrides=[
            f"trial.data.path={fake_fmnist_dir}",
            f"trial.backbone.name={tiny_vit_dir}",
            "trial.data.classes=[0,1,2]",
            *SMALL,
            *overrides,
        ]
    )


def test_every_searched_value_is_a_variant(fake_fmnist_dir, tiny_vit_dir):
    cfg = _cfg(fake_fmnist_dir, tiny_vit_dir, "search.space.peft.rank={kind: choice, values: [2, 4]}")
    origins = [v.origin for v in preflight.variants(cfg)]
    assert origins == ["trial", "search.space.peft.rank=2", "search.space.peft.rank=4"]


def test_inputs_load_once_and_count_what_the_estimates_need(fake_fmnist_dir, tiny_vit_dir):
    cfg = _cfg(fake_fmnist_dir, tiny_vit_dir, "search.space.peft.rank={kind: choice, values: [2, 4]}")
    inputs = preflight.check_inputs(cfg, log=lambda _: None)
    assert set(inputs.n_train.values()) == {64}
    assert inputs.tuned["search.space.peft.rank=4"] > inputs.tuned["search.space.peft.rank=2"]


def test_a_missing_data_set_or_a_corrupt_backbone_is_named_before_ray(
    fake_fmnist_dir, tiny_vit_dir, tmp_path
):
    cfg = _cfg(tmp_path / "nowhere", tiny_vit_dir)
    with pytest.raises(
        ConfigError, match=r"invalid input \(trial\):\n  Fashion-MNIST directory .*does not exist"
    ):
        preflight.check_inputs(cfg, log=lambda _: None)
    broken = tmp_path / "vit"
    shutil.copytree(tiny_vit_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match=r"model\.safetensors is corrupt or truncated"):
        preflight.check_inputs(_cfg(fake_fmnist_dir, broken), log=lambda _: None)
    cfg = load_sweep_config(
        overrides=[
            f"trial.data.path={fake_fmnist_dir}",
            f"trial.backbone.name={tiny_vit_dir}",
            "trial.data.classes=[0,1,2]",
            *SMALL,
            "search.space={backbone: {name: {kind: choice, values: ['" + str(broken) + "']}}}",
        ]
    )
    with pytest.raises(ConfigError, match=rf"invalid input \(search\.space\.backbone\.name='{broken}'\)"):
        preflight.check_inputs(cfg, log=lambda _: None)


def test_absurd_settings_are_refused_with_an_estimate(fake_fmnist_dir, tiny_vit_dir):
    cfg = _cfg(fake_fmnist_dir, tiny_vit_dir, "trial.train.epochs=1000000000")
    inputs = preflight.check_inputs(cfg, log=lambda _: None)
    with pytest.raises(
        ConfigError, match=r"trial\.train\.epochs=1000000000 \(trial\): 1,000,000,000 training steps"
    ):
        preflight.check_cost(cfg, inputs, memory_bytes=2**34, concurrency=1, log=lambda _: None)
    gpu = _cfg(fake_fmnist_dir, tiny_vit_dir, "trial.train.epochs=1000000000", "resources.gpus_per_trial=1")
    with pytest.raises(ConfigError, match=r"training steps per trial; lower"):
        preflight.check_cost(gpu, inputs, memory_bytes=2**34, concurrency=1, log=lambda _: None)
    cfg = _cfg(fake_fmnist_dir, tiny_vit_dir, "trial.laplace.n_samples=100000000")
    inputs = preflight.check_inputs(cfg, log=lambda _: None)
    with pytest.raises(
        ConfigError, match=r"n_samples=100000000 \(trial\): the posterior samples .* GiB, more than"
    ):
        preflight.check_cost(cfg, inputs, memory_bytes=2**34, concurrency=1, log=lambda _: None)


def test_a_long_sweep_is_announced(fake_fmnist_dir, tiny_vit_dir, monkeypatch):
    cfg = _cfg(fake_fmnist_dir, tiny_vit_dir, "trial.train.epochs=1000")
    inputs = preflight.check_inputs(cfg, log=lambda _: None)
    monkeypatch.setattr(preflight, "_step_seconds", lambda *args: 60.0)  # a slow machine
    lines = []
    preflight.check_cost(cfg, inputs, memory_bytes=2**34, concurrency=2, log=lines.append)
    assert lines and "fine-tuning alone will take about" in lines[0] and "4 trials, 2 at once" in lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_that_is_not_ray_fails_in_seconds():
    """Nobody listening, an HTTP server, a server that never answers: each refused within seconds
    (Ray itself retries for minutes); a gRPC server (what Ray's GCS and Ray Client are) passes."""
    import grpc

    http_server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        for address, message in (
            (f"127.0.0.1:{_closed_port()}", "Connection refused"),
            (f"ray://127.0.0.1:{http_server.server_port}", "something answers there, but not Ray"),
            (f"127.0.0.1:{silent.getsockname()[1]}", "timed out"),
            ("nonsense", "cannot reach the Ray cluster at --address 'nonsense'"),
        ):
            start = time.monotonic()
            with pytest.raises(preflight.AddressError, match=message):
                preflight.check_address(address, timeout_s=2)
            assert time.monotonic() - start < 5
        preflight.check_address(f"127.0.0.1:{grpc_port}")
        preflight.check_address("auto")
    finally:
        http_server.shutdown()
        silent.close()
        grpc_server.stop(0)


def test_more_glm_shards_than_validation_examples_are_refused_naming_the_field(fake_fmnist_dir, tiny_vit_dir):
    """Within the caps (max_val=32) but beyond the real split: classes 0-2 leave 18 validation images."""
    cfg = _cfg(fake_fmnist_dir, tiny_vit_dir, "resources.eval_tasks=20")
    with pytest.raises(ConfigError, match=r"resources\.eval_tasks=20: .* 18 examples .*validation split"):
        preflight.check_inputs(cfg, log=lambda _: None)
    preflight.check_inputs(_cfg(fake_fmnist_dir, tiny_vit_dir, "resources.eval_tasks=18"), log=lambda _: None)
