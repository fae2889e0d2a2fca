"""The MLflow UI as a newcomer sees it, in a real headless browser (Playwright driving Debian's Chromium).

A sweep's MLflow tree (made by :mod:`distlap.sweep.tracking`, the code the sweep runs; or a real sweep's
with ``DISTLAP_UI_SWEEP=<sweep output folder>``) is served by ``mlflow ui``; the URL the sweep prints
must open the runs table (not the GenAI overview) with the sweep > trial > subset tree visible at once
and the key metrics as columns; a trial run's page describes its metrics and holds its plots, a subset
run holds its reliability diagram. With ``DISTLAP_SCREENSHOTS=DIR`` the three levels are saved there
(``docs/mlflow_{runs,trial,subset}.png`` in the README come from a smoke sweep this way).

    python -m pytest -m browser tests/sweep/test_mlflow_ui.py

needs ``pip install playwright`` (the ``test`` extra) and ``apt-get install chromium`` (``.ci/run``
installs it); without them the test is skipped and says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from distlap import names
from distlap.names import KIND_TAG, ORDER_TAG
from distlap.sweep.progress import runs_url
from distlap.sweep.settings import load_sweep_config
from distlap.sweep.tracking import SweepTracker, TrialRun, experiment_id, view_key
from helpers import MLFLOW_SERVER_ENV

CHROMIUM = os.environ.get("DISTLAP_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
OBJECTIVE, MAP_ECE = names.score("bayes", "val", "nll"), names.score("map", "test", "ece")
METRICS = [OBJECTIVE, MAP_ECE, names.delta("subset", "test")]
WORKFLOW_KEY = "mlflow.workflowType_v1"  # where MLflow 3.17's UI keeps the GenAI / Model training choice
pytestmark = [pytest.mark.browser, pytest.mark.slow]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"needs Chromium at {CHROMIUM}: apt-get install chromium", allow_module_level=True)


def _subset_result(names_: list[str]) -> dict:
    metrics = {key: 0.05 for split in ("val", "test") for key in names.scores("subset", split).values()}
    delta = names.delta("subset", "test")
    metrics.update({delta: 0.01, **dict(zip(names.interval(delta), (-0.01, 0.03)))})
    return {"subsets": {n: {"blocks": [i], "metrics": metrics} for i, n in enumerate(names_)}}


def _synthetic_sweep(folder: Path) -> tuple[str, str]:
    """Two trials of three subsets each, logged the way a sweep logs them; (tracking URI, sweep id)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = SweepTracker.open(
        uri,
        "distlap-layerwise",
        "ui-sweep",
        run_name="ui-sweep",
        artifact_location=str(folder / "mlartifacts"),
        params={"search.num_samples": 2},
    )
    tracker.share_view(["peft.rank"], METRICS)
    plots = folder / "plots"
    plots.mkdir()
    shutil.copy(
        Path(__file__).resolve().parents[2] / "docs" / "delta_ece_ranked.png", plots / "reliability_map.png"
    )
    for name in ("layer_0", "layer_1", "all"):
        shutil.copy(plots / "reliability_map.png", plots / f"reliability_{name}.png")
    for i in range(2):
        run_id = tracker.trial_run(f"t{i}", run_name=f"trial-{i:03d}", params={"peft.rank": 4 * (i + 1)})
        with TrialRun(uri, run_id) as run:
            run.log_history([{"epoch": 1, names.EPOCH_TIME: 0.5, names.TRAIN_LOSS: 1.0}])
            run.log(metrics={METRICS[0]: 1.6 - i / 10, METRICS[1]: 0.07, names.TIME_PER_EPOCH: 0.5})
            run.log_subsets(_subset_result(["layer_0", "layer_1", "all"]), plots)
    tracker.finish(metrics={names.N_TRIALS: 2}, artifacts=[])
    return uri, "ui-sweep"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, tracking URI, sweep id, experiment id) of an ``mlflow ui`` on a free loopback port."""
    if os.environ.get("DISTLAP_UI_SWEEP"):
        cfg = load_sweep_config(Path(os.environ["DISTLAP_UI_SWEEP"]) / "config.yaml")
        uri, sweep, experiment = cfg.tracking.uri, cfg.search.study_name, cfg.tracking.experiment
    else:
        (uri, sweep), experiment = _synthetic_sweep(tmp_path_factory.mktemp("ui")), "distlap-layerwise"
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, **MLFLOW_SERVER_ENV}
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{base}/health", server)
        yield base, uri, sweep, experiment_id(uri, experiment)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):  # its job consumers, should any linger
            os.killpg(server.pid, signal.SIGKILL)


def _wait_for(url: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow ui exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"mlflow ui did not answer {url} in {timeout_s} s")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("DISTLAP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"mlflow_{name}.png"))


def _runs_in_order(uri: str, experiment: str, sweep: str) -> list:
    client = MlflowClient(uri)
    runs = client.search_runs([experiment], f"tags.`{names.SWEEP_TAG}` = '{sweep}'", max_results=1000)
    return sorted(runs, key=lambda r: r.data.tags[ORDER_TAG])


def test_the_printed_url_opens_the_runs_table_with_the_whole_tree_and_key_metrics(served, browser):
    base, uri, sweep, experiment = served
    runs = _runs_in_order(uri, experiment, sweep)
    page = browser.new_page(viewport={"width": 1400, "height": 860})
    page.goto(runs_url(base, experiment, view_key(sweep)))
    last = runs[-1].info.run_name
    page.get_by_role("link", name=last, exact=True).wait_for(timeout=120_000)  # the last subset, unfolded
    assert "workflowType=machine_learning" in page.url
    assert page.get_by_role("heading", name="Runs").is_visible()  # the runs table, not GenAI's overview
    close = page.get_by_role("button", name="Close")  # the MLflow Assistant opens on a first visit
    if close.count():
        close.first.click()
    for run in runs[:12]:  # sweep, trials and subsets, each its own row, none folded away
        name = run.info.run_name
        assert page.get_by_role("link", name=name, exact=True).first.is_visible(), name
    headers = page.get_by_role("columnheader").all_inner_texts()
    assert {"Run Name", OBJECTIVE, MAP_ECE} <= set(headers), headers  # key metrics as columns
    _shot(page, "runs")
    page.close()


def test_trial_and_subset_pages_describe_their_metrics_and_hold_their_plots(served, browser):
    base, uri, sweep, experiment = served
    runs = _runs_in_order(uri, experiment, sweep)
    trial = next(r for r in runs if r.data.tags[KIND_TAG] == "trial")
    subset = next(r for r in runs if r.data.tags[KIND_TAG] == "subset")
    # MLflow 3.17 keeps "Model training" for run pages only once it was picked in this browser (the
    # README says so); without it these pages show the same content under GenAI's side bar.
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    context.add_init_script(f"localStorage.setItem('{WORKFLOW_KEY}', '\"machine_learning\"')")
    page = context.new_page()
    page.goto(runs_url(base, experiment, view_key(sweep)))
    close = page.get_by_role("button", name="Close")  # the MLflow Assistant, as above
    close.first.wait_for(timeout=120_000)
    close.first.click()
    page.get_by_role("link", name=trial.info.run_name, exact=True).click()  # as a person would
    page.get_by_role("tab", name="Artifacts").wait_for(timeout=60_000)  # the trial run's page
    meaning = names.describe(names.TIME_PER_EPOCH).axis()  # "fine-tuning time per epoch [s] (lower ...)"
    page.get_by_text(meaning).wait_for(state="attached")  # its description lists each metric's meaning
    page.get_by_role("link", name=subset.info.run_name, exact=True).first.wait_for()  # its child runs
    _shot(page, "trial")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("plots", exact=True).click()
    page.get_by_text("reliability_map.png").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Overview").click()
    page.get_by_role("link", name=subset.info.run_name, exact=True).first.click()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text(f"reliability_{subset.data.tags[names.SUBSET_TAG]}.png").click()
    page.locator("img[src^='blob:']").first.wait_for(timeout=30_000)  # the diagram is shown
    _shot(page, "subset")
    context.close()
