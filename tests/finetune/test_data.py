"""distlap.finetune.data: idx reader, Fashion-MNIST / CIFAR loading, seeded splits, transform, loaders.

All data are built here in tmp folders; nothing touches the network.
"""

import gzip
import os
import pickle
import time

import numpy as np
import pytest
import torch

from distlap.config import DataConfig
from distlap.finetune.data import DataError, ImageTransform, Splits, load_splits, make_loader, read_idx
from distlap.zoo import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR

_IDX_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path, array: np.ndarray, dtype: str = "u1") -> None:
    """Write ``array`` as an idx file (gzip-compressed when the name ends in .gz)."""
    dt = np.dtype(dtype)
    header = bytes([0, 0, _IDX_CODES[dt], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(dt).tobytes()
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(raw)


def unique_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 28, 28) uint8 random images whose first two pixels encode their index (all distinct)."""
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def image_index(images: torch.Tensor) -> list[int]:
    """Invert :func:`unique_images` for a (N, 1, 28, 28) batch."""
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


N_TRAIN, N_TEST = 60, 20


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Fake Fashion-MNIST: 60 train / 20 test unique images; image i has label i % 10.

    Train files are gzip-compressed, test files plain, as both occur in the wild.
    """
    d = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    write_idx(d / "train-images-idx3-ubyte.gz", unique_images(N_TRAIN, rng))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(N_TRAIN) % 10)
    write_idx(d / "t10k-images-idx3-ubyte", unique_images(N_TEST, rng))
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(N_TEST) % 10)
    return d


def fashion(path, seed=0, **kw) -> Splits:
    return load_splits(DataConfig(dataset="fashion_mnist", path=str(path), **kw), seed=seed)


# --- read_idx ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", ">i4", ">f4"])
def test_read_idx_round_trips(tmp_path, suffix, dtype):
    array = np.random.default_rng(1).integers(0, 200, (3, 4, 5))
    write_idx(tmp_path / f"x{suffix}", array, dtype)
    out = read_idx(tmp_path / f"x{suffix}")
    assert out.shape == (3, 4, 5) and out.dtype.isnative and out.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


# --- Fashion-MNIST splits ------------------------------------------------------------------------


def test_fashion_shapes_dtypes_and_sizes(fashion_dir):
    s = fashion(fashion_dir, val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (45, 15, 20)
    for split in (s.train, s.val, s.test):
        images, labels = split.tensors
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
        assert labels.dtype == torch.int64 and labels.shape == (len(images),)
        # The label travels with its image: image i was written with label i % 10.
        assert labels.tolist() == [i % 10 for i in image_index(images)]
    assert s.num_classes == 10 and s.class_names == FASHION_MNIST_CLASSES


def test_train_and_val_partition_the_train_split(fashion_dir):
    s = fashion(fashion_dir, val_fraction=0.3)
    train, val = set(image_index(s.train.tensors[0])), set(image_index(s.val.tensors[0]))
    assert not train & val
    assert train | val == set(range(N_TRAIN))
    assert set(image_index(s.test.tensors[0])) == set(range(N_TEST))


def test_splits_are_seeded(fashion_dir):
    a, b, c = fashion(fashion_dir, seed=3), fashion(fashion_dir, seed=3), fashion(fashion_dir, seed=4)
    for name in ("train", "val", "test"):
        for x, y in zip(getattr(a, name).tensors, getattr(b, name).tensors):
            assert torch.equal(x, y)
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_caps_subsample_without_moving_the_partition(fashion_dir):
    full = fashion(fashion_dir, seed=1, val_fraction=0.25)
    capped = fashion(fashion_dir, seed=1, val_fraction=0.25, max_train=10, max_val=4, max_test=5)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (10, 4, 5)
    for name in ("train", "val", "test"):
        assert set(image_index(getattr(capped, name).tensors[0])) <= set(
            image_index(getattr(full, name).tensors[0])
        )
    other = fashion(fashion_dir, seed=2, val_fraction=0.25, max_train=10)
    assert image_index(other.train.tensors[0]) != image_index(capped.train.tensors[0])
    # A cap above the split size leaves it whole.
    assert len(fashion(fashion_dir, seed=1, val_fraction=0.25, max_train=1000).train) == 45


def test_class_subset_relabels_in_the_given_order(fashion_dir):
    s = fashion(fashion_dir, classes=[7, 5, 9])
    assert s.num_classes == 3 and s.class_names == ["Sneaker", "Sandal", "Ankle boot"]
    assert len(s.train) + len(s.val) == 18 and len(s.test) == 6
    for split in (s.train, s.val, s.test):
        images, labels = split.tensors
        assert labels.tolist() == [{7: 0, 5: 1, 9: 2}[i % 10] for i in image_index(images)]


def test_class_id_out_of_range(fashion_dir):
    with pytest.raises(DataError, match=r"names class 10 but fashion_mnist has 10 classes"):
        fashion(fashion_dir, classes=[3, 10])


def test_missing_fashion_data_names_the_fix(tmp_path, fashion_dir):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        fashion(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "data.path=" in str(err.value)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(
        (fashion_dir / "train-images-idx3-ubyte.gz").read_bytes()
    )
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\(\.gz\) not found.*apt-get install"):
        fashion(tmp_path / "partial")


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"real Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    assert read_idx(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")).shape == (60000, 28, 28)
    assert read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")).shape == (10000,)
    s = load_splits(DataConfig(classes=[5, 6, 7, 8, 9], max_train=100, max_val=50, max_test=30), seed=0)
    assert s.train.tensors[0].shape == (100, 1, 28, 28) and len(s.val) == 50 and len(s.test) == 30
    assert s.class_names == FASHION_MNIST_CLASSES[5:]
    assert set(s.train.tensors[1].tolist()) == set(range(5))


# --- CIFAR through HF datasets -------------------------------------------------------------------


def save_cifar_like(path, label_cols: dict, image_col="img", n_train=40, n_test=20, splits=("train", "test")):
    """A tiny DatasetDict of random 32x32 RGB PIL images, written with ``save_to_disk``.

    ``label_cols`` maps a column name to its class count; labels are i % count. Returns the train
    images as (N, 3, 32, 32) uint8.
    """
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            image_col: datasets.Image(),
            **{
                col: datasets.ClassLabel(names=[f"{col}{i}" for i in range(k)])
                for col, k in label_cols.items()
            },
        }
    )
    arrays = {}
    for split, n in zip(("train", "test"), (n_train, n_test)):
        arrays[split] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        columns = {
            image_col: [Image.fromarray(a) for a in arrays[split]],
            **{col: [i % k for i in range(n)] for col, k in label_cols.items()},
        }
        arrays[split + "_ds"] = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({s: arrays[s + "_ds"] for s in splits}).save_to_disk(str(path))
    return torch.from_numpy(arrays["train"].transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("image_col", ["img", "image"])
def test_cifar10_from_disk(tmp_path, image_col):
    source = save_cifar_like(tmp_path, {"label": 10}, image_col=image_col)
    s = load_splits(DataConfig(dataset="cifar10", path=str(tmp_path), val_fraction=0.25), seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 20)
    assert s.num_classes == 10 and s.class_names == [f"label{i}" for i in range(10)]
    assert s.train.tensors[0].dtype == torch.uint8 and s.train.tensors[0].shape[1:] == (3, 32, 32)
    # Pixels survive the PNG round trip and keep their labels; train and val partition train.
    by_bytes = {source[i].numpy().tobytes(): i % 10 for i in range(len(source))}
    seen = []
    for split in (s.train, s.val):
        for image, label in zip(*split.tensors):
            seen.append(image.numpy().tobytes())
            assert by_bytes[seen[-1]] == label
    assert sorted(seen) == sorted(by_bytes)


def test_cifar100_uses_fine_labels_and_class_subset(tmp_path):
    save_cifar_like(tmp_path, {"fine_label": 100, "coarse_label": 20}, n_train=60)
    s = load_splits(DataConfig(dataset="cifar100", path=str(tmp_path)), seed=0)
    assert s.num_classes == 100 and s.class_names[42] == "fine_label42"
    assert int(s.train.tensors[1].max()) >= 20  # fine labels, not the 20 coarse ones
    sub = load_splits(DataConfig(dataset="cifar100", path=str(tmp_path), classes=[50, 3]), seed=0)
    assert sub.class_names == ["fine_label50", "fine_label3"]
    assert len(sub.train) + len(sub.val) == 2 and len(sub.test) == 1  # labels are i % 100


def test_cifar_grey_and_rgba_pictures_become_rgb(tmp_path):
    import datasets
    from PIL import Image

    pictures = [
        Image.new("L", (32, 32), 7),
        Image.new("RGBA", (32, 32), (1, 2, 3, 4)),
        Image.new("RGB", (32, 32), (5, 6, 7)),
    ]
    split = datasets.Dataset.from_dict(
        {"img": pictures, "label": [0, 1, 0]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path))
    s = load_splits(DataConfig(dataset="cifar10", path=str(tmp_path)), seed=0)
    test_images = s.test.tensors[0]
    assert test_images.shape == (3, 3, 32, 32)
    assert test_images[:, :, 0, 0].tolist() == [[7, 7, 7], [1, 2, 3], [5, 6, 7]]


def test_cifar_missing_split_or_column(tmp_path):
    save_cifar_like(tmp_path / "a", {"label": 10}, splits=("train",))
    with pytest.raises(DataError, match=r"needs splits 'train' and 'test' but holds \['train'\]"):
        load_splits(DataConfig(dataset="cifar10", path=str(tmp_path / "a")), seed=0)
    save_cifar_like(tmp_path / "b", {"target": 10})
    with pytest.raises(DataError, match=r"'label' column but has columns \['img', 'target'\]"):
        load_splits(DataConfig(dataset="cifar10", path=str(tmp_path / "b")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a directory written by `save_to_disk`"):
        load_splits(DataConfig(dataset="cifar10", path=str(tmp_path / "empty")), seed=0)


def test_offline_hub_fails_fast_with_the_fix(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # datasets reads HF_HUB_OFFLINE once at import; setting only the variable afterwards would let
    # it retry the network for ~20 s. The module constant is what load_dataset actually checks.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"'no-such-org/no-such-dataset'.*save_to_disk.*data\.path="):
        load_splits(DataConfig(dataset="cifar10", path="no-such-org/no-such-dataset"), seed=0)
    assert time.perf_counter() - start < 5


# --- transform and loaders -----------------------------------------------------------------------


def test_transform_grey_to_rgb_resize_and_normalise():
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = ImageTransform(32, 3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    # The same grey picture in every channel, up to each channel's normalisation.
    torch.testing.assert_close(out[:, 0] * 0.2 + 0.5, out[:, 2] * 0.5 + 0.3)


def test_transform_normalisation_by_hand():
    images = torch.tensor(
        [[[[0, 255], [255, 0]], [[51, 102], [51, 102]], [[255, 0], [0, 255]]]], dtype=torch.uint8
    )  # (1, 3, 2, 2): no resize
    out = ImageTransform(2, 3, mean=(0.5, 0.1, 0.0), std=(0.5, 0.1, 2.0))(images)
    # /255 gives (0, 1; 1, 0), (0.2, 0.4; 0.2, 0.4), (1, 0; 0, 1); then (x - mean) / std.
    expected = torch.tensor(
        [[[[-1.0, 1.0], [1.0, -1.0]], [[1.0, 3.0], [1.0, 3.0]], [[0.5, 0.0], [0.0, 0.5]]]]
    )
    torch.testing.assert_close(out, expected)
    grey = ImageTransform(2, 1, mean=(0.2,), std=(0.5,))(images)
    # Channel means 0.4, 1.4/3, 0.4, 1.4/3; then (x - 0.2) / 0.5.
    expected_grey = (torch.tensor([[0.4, 1.4 / 3], [0.4, 1.4 / 3]]) - 0.2) / 0.5
    torch.testing.assert_close(grey, expected_grey.view(1, 1, 2, 2))


def test_transform_pickles():
    transform = ImageTransform(16, 3, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(pickle.loads(pickle.dumps(transform))(images), transform(images))


def test_make_loader(fashion_dir):
    dataset = fashion(fashion_dir).test  # 20 examples
    transform = ImageTransform(32, 3, mean=(0.5,) * 3, std=(0.5,) * 3)

    def order(loader):
        return [i for images, _ in loader for i in image_index(images)]

    raw = make_loader(dataset, 8, shuffle=True, seed=5, transform=None)
    assert order(raw) == order(make_loader(dataset, 8, shuffle=True, seed=5, transform=None))
    assert order(raw) != order(make_loader(dataset, 8, shuffle=True, seed=6, transform=None))
    assert sorted(order(raw)) == list(range(N_TEST))
    assert order(make_loader(dataset, 8, shuffle=False, seed=0, transform=None)) == list(range(N_TEST))
    batches = list(make_loader(dataset, 8, shuffle=False, seed=0, transform=transform))
    assert [len(labels) for _, labels in batches] == [8, 8, 4]  # last partial batch kept
    images, labels = batches[0]
    assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
    assert labels.dtype == torch.int64
    pickle.loads(pickle.dumps(make_loader(dataset, 8, shuffle=True, seed=0, transform=transform).collate_fn))
