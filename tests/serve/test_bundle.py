"""The predictor folder's spec and checksums: every file recorded, a missing, altered or extra file named."""

import json

import pytest

from distlap.serve.bundle import CHECKSUMS_FILE, ModelFolderError, Spec, Transform, verify, write_checksums


def _folder(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "a.safetensors").write_bytes(b"tensors")
    (tmp_path / "predictor.json").write_text("{}")
    write_checksums(tmp_path)
    return tmp_path


def test_spec_round_trips_through_json(tmp_path):
    spec = Spec(
        "late", [3], 10.0, "distlap/vit-mini-fmnist", Transform(28, 1, [0.3], [0.4]), [28, 28, 1], ["a"]
    )
    spec.write(tmp_path)
    assert Spec.read(tmp_path) == spec
    assert json.loads((tmp_path / "predictor.json").read_text())["transform"]["image_size"] == 28


def test_an_intact_folder_verifies(tmp_path):
    folder = _folder(tmp_path)
    assert set(json.loads((folder / CHECKSUMS_FILE).read_text())) == {
        "adapter/a.safetensors",
        "predictor.json",
    }
    verify(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "adapter" / "a.safetensors").unlink(), "adapter/a.safetensors is missing"),
        (lambda f: (f / "predictor.json").write_text("{ }"), "predictor.json was altered"),
        (lambda f: (f / "extra.pkl").write_bytes(b"\x80\x04"), "extra.pkl was not exported"),
        (lambda f: (f / CHECKSUMS_FILE).unlink(), f"{CHECKSUMS_FILE} is missing"),
    ],
    ids=["missing", "altered", "extra", "no-checksums"],
)
def test_a_damaged_folder_is_refused_with_one_line(tmp_path, damage, message):
    folder = _folder(tmp_path)
    damage(folder)
    with pytest.raises(ModelFolderError, match=message) as err:
        verify(folder)
    assert "\n" not in str(err.value) and "export the model again" in str(err.value)
