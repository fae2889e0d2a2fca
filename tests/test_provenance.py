import json
import re

from distlap.provenance import git_state, machine, package_versions, provenance, write_benchmark


def test_git_commit_of_this_checkout():
    state = git_state()
    assert re.fullmatch(r"[0-9a-f]{40}", state["git_commit"])
    assert isinstance(state["git_dirty"], bool)


def test_outside_a_repository_there_is_no_commit(tmp_path):
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}


def test_versions_of_the_pinned_packages():
    versions = package_versions()
    assert versions["torch"] == "2.14.1" and versions["torchvision"] == "0.29.1"
    assert versions["laplace-torch"] == "0.3"


def test_benchmark_record_carries_settings_figures_and_where_they_came_from(tmp_path):
    path = write_benchmark("toy", {"n": 3}, {"ratio": 2.5}, out_dir=tmp_path)
    record = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("toy-") and path.suffix == ".json"
    assert record["settings"] == {"n": 3} and record["figures"] == {"ratio": 2.5}
    assert record["provenance"]["git_commit"] == provenance()["git_commit"]
    assert record["machine"]["cpus"] == machine()["cpus"] >= 1
