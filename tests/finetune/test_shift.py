"""distlap.finetune.shift: seeded corruptions, near/far OOD, and the CIFAR-10-C / SVHN file loaders."""

import itertools

import numpy as np
import pytest
import scipy.io
import torch

from distlap.finetune import shift as S
from distlap.finetune.data import DataError


def _images(n=16, c=1, size=28, seed=0):
    """Natural-image-like uint8 images: Gaussian random fields with a power-law spectrum (amplitude
    ~ 1/f^2), each stretched to 0..255. Artificial sharp-edged shapes would make the resampling phase,
    not the severity, dominate the pixelate distance at 1-2 px steps."""
    g = torch.Generator().manual_seed(seed)
    fy, fx = torch.fft.fftfreq(size)[:, None], torch.fft.rfftfreq(size)[None]
    amplitude = 1 / (fy**2 + fx**2 + size**-2)  # (size, size // 2 + 1)
    shape = (n, c, size, size // 2 + 1)
    x = torch.fft.irfft2(
        torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) * amplitude,
        s=(size, size),
    )  # (n, c, size, size)
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return ((x - low) / (high - low) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", sorted(S.CORRUPTIONS))
@pytest.mark.parametrize("c, size", [(1, 28), (3, 32)])
def test_corruption_keeps_shape_dtype_and_is_seeded(name, c, size):
    x = _images(c=c, size=size)
    out = S.corrupt(x, name, 3, seed=1)
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)
    assert torch.equal(out, S.corrupt(x, name, 3, seed=1))  # same seed -> same bytes
    other = S.corrupt(x, name, 3, seed=2)
    if name in ("gaussian_noise", "rotation"):  # the two that draw numbers
        assert not torch.equal(out, other)
    else:
        assert torch.equal(out, other)


@pytest.mark.parametrize("name", sorted(S.CORRUPTIONS))
@pytest.mark.parametrize("c, size", [(1, 28), (3, 32)])
def test_distance_grows_with_severity(name, c, size):
    x = _images(n=32, c=c, size=size)
    dist = [(S.corrupt(x, name, s, seed=0).float() - x.float()).abs().mean().item() for s in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(dist)), dist


def test_noise_has_the_tabled_sigma():
    x = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    for severity, sigma in enumerate(S.SEVERITIES["gaussian_noise"], start=1):
        std = (S.gaussian_noise(x, severity).float() / 255).std().item()
        assert std == pytest.approx(sigma, rel=0.03)


def test_contrast_matches_the_formula_on_grey_images():
    x = _images()
    out = S.contrast(x, 2)  # c = 0.5
    mean = x.float().mean(dim=(1, 2, 3), keepdim=True)
    assert (out.float() - (0.5 * x.float() + 0.5 * mean)).abs().max() <= 1.0


@pytest.mark.parametrize("severity", [0, 6, 2.0, True])
def test_severity_out_of_range_is_refused(severity):
    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5"):
        S.corrupt(_images(), "contrast", severity)


def test_bad_corruption_and_images_are_refused():
    with pytest.raises(ValueError, match="corruption must be one of"):
        S.corrupt(_images(), "fog", 1)
    with pytest.raises(ValueError, match="uint8"):
        S.corrupt(_images().float(), "contrast", 1)


# ------------------------------------------------------------------------------------------ OOD sets


def test_held_out_classes_returns_the_unseen_ones():
    x, y = _images(n=20), torch.arange(20) % 10
    images, labels = S.held_out_classes(x, y, fine_tuned_classes=[5, 6, 7, 8, 9])
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3, 4] and torch.equal(images, x[y < 5])
    _, only = S.held_out_classes(x, y, [5, 6, 7, 8, 9], ood_classes=[0, 3])
    assert sorted(only.unique().tolist()) == [0, 3]


def test_held_out_classes_refuses_overlap_naming_both_lists():
    x, y = _images(n=20), torch.arange(20) % 10
    named = r"ood_classes \[0, 5\] and fine_tuned_classes \[5, 6\] overlap in \[5\]"
    with pytest.raises(ValueError, match=named):
        S.held_out_classes(x, y, [6, 5], ood_classes=[5, 0])
    with pytest.raises(ValueError, match="no test example"):
        S.held_out_classes(x, y, list(range(10)))


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3)])
def test_digits_ood_layout_and_seed(size, channels):
    out = S.digits_ood(50, size, channels, seed=3)
    assert out.shape == (50, channels, size, size) and out.dtype == torch.uint8
    assert out.max() > 200 and torch.equal(out, S.digits_ood(50, size, channels, seed=3))
    assert not torch.equal(out, S.digits_ood(50, size, channels, seed=4))
    assert torch.equal(out[:, 0], out[:, -1])
    with pytest.raises(ValueError, match="n must be an integer in 1..1797"):
        S.digits_ood(1798, size, channels)


# ------------------------------------------------------------------------------- CIFAR-10-C and SVHN


def _fake_cifar10c(folder, n=4):
    """The release's format at n = 4 per severity: (5 n, 32, 32, 3) uint8 with the severity in pixel 0."""
    folder.mkdir(exist_ok=True)
    images = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.repeat(np.arange(1, 6), n)
    images[:, 1, 2, :] = [10, 20, 30]
    np.save(folder / "contrast.npy", images)
    np.save(folder / "labels.npy", np.tile(np.arange(n), 5).astype(np.uint8))
    return folder


def test_load_cifar10c_picks_the_severity_block(tmp_path):
    folder = _fake_cifar10c(tmp_path / "CIFAR-10-C")
    images, labels = S.load_cifar10c(folder, "contrast", 3)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert (images[:, 0, 0, 0] == 3).all() and labels.tolist() == [0, 1, 2, 3]
    assert images[0, :, 1, 2].tolist() == [10, 20, 30]  # HWC -> CHW


def test_load_cifar10c_errors_name_the_path_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"folder .*nowhere.* does not exist\. Fix: download CIFAR-10-C"):
        S.load_cifar10c(tmp_path / "nowhere", "contrast", 1)
    folder = _fake_cifar10c(tmp_path / "c")
    with pytest.raises(DataError, match=r"fog\.npy' does not exist\. Fix"):
        S.load_cifar10c(folder, "fog", 1)
    np.save(folder / "pixelate.npy", np.zeros((7, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="malformed"):
        S.load_cifar10c(folder, "pixelate", 1)
    (folder / "snow.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="cannot read"):
        S.load_cifar10c(folder, "snow", 1)
    with pytest.raises(ValueError, match="corruption must be one of"):
        S.load_cifar10c(folder, "rotation", 1)


def test_load_svhn_test(tmp_path):
    x = np.zeros((32, 32, 3, 5), dtype=np.uint8)
    x[3, 4, :, 1] = [7, 8, 9]
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [9], [10]])})
    for path in (tmp_path, tmp_path / "test_32x32.mat"):
        images, labels = S.load_svhn_test(path)
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
        assert images[1, :, 3, 4].tolist() == [7, 8, 9] and labels.tolist() == [0, 1, 2, 9, 0]


def test_load_svhn_errors(tmp_path):
    with pytest.raises(DataError, match=r"test_32x32\.mat' does not exist\. Fix: download SVHN"):
        S.load_svhn_test(tmp_path)
    scipy.io.savemat(tmp_path / "wrong.mat", {"X": np.zeros((28, 28, 5))})
    with pytest.raises(DataError, match="is not SVHN's test_32x32.mat"):
        S.load_svhn_test(tmp_path / "wrong.mat")
    (tmp_path / "broken.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        S.load_svhn_test(tmp_path / "broken.mat")
