"""Data pipeline: real on-disk formats (written as tiny fixtures), transforms, subsets, samplers, errors."""

import gzip
import os
import pickle
import struct
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller_blockkd.data import (
    DATASET_TYPES,
    ShardSampler,
    balanced_subset_indices,
    build_datasets,
    dataset_description,
    get_dataloaders,
)
from mdistiller_blockkd.data import cifar100 as cifar_mod
from mdistiller_blockkd.data import fashion_mnist as fm_mod
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.errors import ConfigError, DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def cfg_of(*opts):
    base = ["DATASET.NUM_WORKERS", 0, "SOLVER.BATCH_SIZE", 4, "DATASET.TEST.BATCH_SIZE", 5, "DATASET.DOWNLOAD", False]
    return load_cfg(None, base + [str(o) if not isinstance(o, (int, float, bool)) else o for o in opts])


# ---------------------------------------------------------------- fixtures in the real formats


def write_cifar_split(path, n, seed):
    """A torchvision-layout CIFAR-100 pickle: dict with b"data" uint8 (n, 3072), b"fine_labels"."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    # image 0: channel planes filled with 10 / 100 / 200 (data rows are channel-major)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 100, 200
    labels = [int(i % 100) for i in range(n)]
    entry = {b"filenames": [b"x.png"] * n, b"batch_label": b"fixture", b"fine_labels": labels,
             b"coarse_labels": [v // 5 for v in labels], b"data": data}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return data, labels


def make_cifar(root, n_train=200, n_test=100):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = write_cifar_split(folder / "train", n_train, 1)
    test = write_cifar_split(folder / "test", n_test, 2)
    return folder, train, test


def idx_bytes(array, code=0x08):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_file(path, array, gz):
    blob = idx_bytes(array)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def make_fmnist(root, n_train=60, n_test=30, gz_train=False, gz_test=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    sets = {}
    for split, n, gz in (("train", n_train, gz_train), ("t10k", n_test, gz_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: padding is recognisable
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx_file(root / f"{split}-images-idx3-ubyte", images, gz)
        write_idx_file(root / f"{split}-labels-idx1-ubyte", labels, gz)
        sets[split] = (images, labels)
    return sets


def make_image_folder(root, classes, per_class=3):
    rng = np.random.default_rng(4)
    for c in classes:
        d = root / c
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")


# ---------------------------------------------------------------- CIFAR-100


def test_cifar100_reads_pickles_with_contract_transforms(tmp_path):
    _, (tr_data, tr_labels), (te_data, te_labels) = make_cifar(tmp_path)
    cfg = cfg_of("DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path))
    train, test, n = build_datasets(cfg)
    assert n == 100 and len(train) == 200 and len(test) == 100
    assert train.targets == tr_labels and test.targets == te_labels
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    for c, v in enumerate((10, 100, 200)):  # channel-major decoding + exact normalisation
        assert torch.allclose(x[c], torch.full((32, 32), (v / 255 - CIFAR_MEAN[c]) / CIFAR_STD[c]), atol=1e-5)
    # a random image: pixel (row 5, col 7) of channel 1 is data[1024 + 5*32 + 7]
    x3, _ = test[3]
    want = (te_data[3, 1024 + 5 * 32 + 7] / 255 - CIFAR_MEAN[1]) / CIFAR_STD[1]
    assert abs(x3[1, 5, 7].item() - want) < 1e-5
    tr_names = [type(t).__name__ for t in train.transform.transforms]
    assert tr_names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transform.transforms[0].padding == 4
    assert [type(t).__name__ for t in test.transform.transforms] == ["ToTensor", "Normalize"]
    train_loader, val_loader, n = get_dataloaders(cfg)
    xb, yb = next(iter(train_loader))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64
    assert sum(len(b[1]) for b in val_loader) == 100


def test_cifar100_extracts_archive_when_only_tarball_present(tmp_path):
    src = tmp_path / "src"
    make_cifar(src, 20, 10)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    train, test, _ = build_datasets(cfg_of("DATASET.TYPE", "cifar100", "DATASET.ROOT", str(root)))
    assert (len(train), len(test)) == (20, 10)
    assert (root / "cifar-100-python" / "train").is_file()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned


def test_cifar100_missing_offline_message(tmp_path):
    cfg = cfg_of("DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path))
    with pytest.raises(DatasetError) as e:
        build_datasets(cfg)
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python" / "train") in msg
    assert "cifar-100-python.tar.gz" in msg and "DATASET.ROOT" in msg and "DATASET.DOWNLOAD is False" in msg


def test_cifar100_failed_download_is_a_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(url, download_root, **kw):
        calls.append((url, kw.get("md5")))
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    cfg = load_cfg(None, ["DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path), "DATASET.DOWNLOAD", True])
    with pytest.raises(DatasetError, match="network unreachable") as e:
        build_datasets(cfg)
    assert calls == [(cifar_mod.URL, cifar_mod.MD5)]
    assert "cifar-100-python.tar.gz" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp leftovers


def test_cifar100_pickle_written_by_numpy1(tmp_path, recwarn):
    """The official files name numpy 1.x's ``numpy.core.multiarray``; they load without warnings."""
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": data, b"fine_labels": [5, 99]}, protocol=2)
    if b"numpy._core.multiarray" in blob:
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    (tmp_path / "split").write_bytes(blob)
    images, labels = cifar_mod.read_split(str(tmp_path / "split"))
    assert images.shape == (2, 32, 32, 3) and labels == [5, 99]
    assert images[1, 0, 1, 2] == data[1, 2048 + 1]  # (row 0, col 1, channel 2)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_cifar100_corrupt_and_hostile_pickles(tmp_path):
    folder, _, _ = make_cifar(tmp_path, 10, 10)
    (folder / "test").write_bytes(b"this is not a pickle")
    cfg = cfg_of("DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path))
    with pytest.raises(DatasetError, match="corrupt") as e:
        build_datasets(cfg)
    assert str(folder / "test") in str(e.value)

    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": Hostile(), b"fine_labels": []}, f)
    with pytest.raises(DatasetError, match="not allowed"):
        build_datasets(cfg)
    assert not marker.exists()


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_plain_and_gzipped_idx(tmp_path):
    sets = make_fmnist(tmp_path / "fm")  # train plain, test gzipped
    cfg = cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(tmp_path / "fm"))
    train, test, n = build_datasets(cfg)
    assert n == 10 and (len(train), len(test)) == (60, 30)
    assert test.targets == sets["t10k"][1].tolist()
    x, y = test[7]
    assert x.shape == (3, 32, 32) and y == 7
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated to 3 channels
    mean, std = fm_mod.MEAN[0], fm_mod.STD[0]
    # 2-px zero border, original image inside
    assert torch.allclose(x[0, :2], torch.full((2, 32), -mean / std))
    assert torch.allclose(x[0, :, 30:], torch.full((32, 2), -mean / std))
    inner = (torch.from_numpy(sets["t10k"][0][7]).float() / 255 - mean) / std
    assert torch.allclose(x[0, 2:30, 2:30], inner, atol=1e-5)
    loader, _, _ = get_dataloaders(cfg)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32)
    assert [type(t).__name__ for t in train.transform.transforms][:2] == ["RandomCrop", "RandomHorizontalFlip"]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "damage",
    ["magic", "truncated", "extra"],
)
def test_fashion_mnist_corrupt_idx_names_the_file(tmp_path, gz, damage):
    root = tmp_path / "fm"
    make_fmnist(root, gz_train=gz, gz_test=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    good = idx_bytes(np.ones((60, 28, 28), np.uint8))
    bad = {"magic": b"\x00\x00\x08\x07" + good[4:], "truncated": good[:-5], "extra": good + b"\x00"}[damage]
    if gz:
        bad = gzip.compress(bad)
    (root / name).write_bytes(bad)
    with pytest.raises(DatasetError, match="corrupt") as e:
        build_datasets(cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(root)))
    assert str(root / name) in str(e.value)


def test_fashion_mnist_bad_gzip_and_missing(tmp_path):
    root = tmp_path / "fm"
    make_fmnist(root)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        build_datasets(cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(root)))
    empty = tmp_path / "empty"
    with pytest.raises(DatasetError) as e:
        build_datasets(cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(empty)))
    msg = str(e.value)
    assert str(empty / "train-images-idx3-ubyte") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "DATASET.ROOT embedded" in msg


def test_fashion_mnist_default_root_is_debian_package():
    assert fm_mod.resolve_root(cfg_of("DATASET.TYPE", "fashion_mnist")) == "/usr/share/datasets/fashion-mnist"


def test_embedded_subset_loads_balanced():
    cfg = cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", "embedded")
    train, test, n = build_datasets(cfg)
    assert n == 10 and (len(train), len(test)) == (3000, 1000)
    assert np.bincount(train.targets).tolist() == [300] * 10
    assert np.bincount(test.targets).tolist() == [100] * 10
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert abs(float(test.images[:, 2:30, 2:30].mean()) / 255 - fm_mod.MEAN[0]) < 0.03  # real images, real stats
    files = os.listdir(fm_mod.EMBEDDED_DIR)
    assert {"README.md", "LICENSE"} <= set(files)
    assert sum(os.path.getsize(os.path.join(fm_mod.EMBEDDED_DIR, f)) for f in files) <= 2_000_000
    assert "Zalando SE" in open(os.path.join(fm_mod.EMBEDDED_DIR, "LICENSE")).read()
    assert "fashion_mnist_mini" in dataset_description(cfg)


def test_make_fmnist_subset_tool(tmp_path, capsys):
    from mdistiller_blockkd.cli import make_fmnist_subset as tool
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0 and "--train" in capsys.readouterr().out
    make_fmnist(tmp_path / "src", n_train=60, n_test=30)
    out = tmp_path / "mini"
    tool.main(["--source", str(tmp_path / "src"), "--out", str(out), "--train", "20", "--test", "10"])
    train, test, _ = build_datasets(cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(out)))
    assert np.bincount(train.targets).tolist() == [2] * 10 and np.bincount(test.targets).tolist() == [1] * 10
    first = (out / "train-images-idx3-ubyte.gz").read_bytes()
    tool.main(["--source", str(tmp_path / "src"), "--out", str(out), "--train", "20", "--test", "10"])
    assert (out / "train-images-idx3-ubyte.gz").read_bytes() == first  # reproducible bytes
    with pytest.raises(Exception, match="over the limit"):
        tool.make_subset(str(tmp_path / "src"), str(tmp_path / "small"), 20, 10, max_bytes=100)
    assert not (tmp_path / "small").exists()


# ---------------------------------------------------------------- ImageNet (ImageFolder)


def test_imagenet_image_folder(tmp_path):
    make_image_folder(tmp_path / "train", ["n01", "n02", "n03"], 4)
    make_image_folder(tmp_path / "val", ["n01", "n02", "n03"], 2)
    cfg = cfg_of("DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path), "DATASET.IMAGE_SIZE", 32)
    train, val, n = build_datasets(cfg)
    assert n == 3 and (len(train), len(val)) == (12, 6)
    x, y = val[5]
    assert x.shape == (3, 32, 32) and y == 2
    assert train[0][0].shape == (3, 32, 32)
    train, val, n = build_datasets(cfg_of("DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path),
                                          "DATASET.IMAGE_SIZE", 32, "DATASET.TRAIN_SUBSET", 6))
    assert n == 3 and sorted(train.targets) == [0, 0, 1, 1, 2, 2]
    assert train[0][0].shape == (3, 32, 32)


def test_imagenet_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected layout") as e:
        build_datasets(cfg_of("DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path)))
    assert str(tmp_path / "train") in str(e.value)
    make_image_folder(tmp_path / "train", ["a", "b"], 1)
    make_image_folder(tmp_path / "val", ["a", "c"], 1)
    with pytest.raises(DatasetError, match="must match"):
        build_datasets(cfg_of("DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path)))


# ---------------------------------------------------------------- synthetic, subsets, samplers, config


def test_synthetic_is_deterministic_and_learnable():
    a_tr, a_te, n = build_datasets(cfg_of("DATASET.TYPE", "synthetic", "EXPERIMENT.SEED", 1))
    b_tr, _, _ = build_datasets(cfg_of("DATASET.TYPE", "synthetic", "EXPERIMENT.SEED", 7))
    assert n == 10 and (len(a_tr), len(a_te)) == (512, 256)
    assert torch.equal(a_tr.images, b_tr.images) and a_tr.targets == b_tr.targets
    assert a_tr[0][0].shape == (3, 32, 32)
    assert np.bincount(a_tr.targets).min() >= 51
    # nearest class mean (fitted on train) beats chance by far on test
    y_tr, y_te = torch.tensor(a_tr.targets), torch.tensor(a_te.targets)
    means = torch.stack([a_tr.images[y_tr == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(a_te.images.flatten(1), means).argmin(1)
    assert (pred == y_te).float().mean() > 0.5
    # images differ from their class template (noise present): not trivially identical
    assert (a_tr.images[y_tr == 0].std(0).mean() > 0.5)
    other = build_datasets(cfg_of("DATASET.TYPE", "synthetic", "DATASET.SYNTHETIC.NUM_CLASSES", 4,
                                  "DATASET.SYNTHETIC.IMAGE_SIZE", 16, "DATASET.SYNTHETIC.TRAIN_SIZE", 40))
    assert other[2] == 4 and other[0][0][0].shape == (3, 16, 16) and len(other[0]) == 40


def test_balanced_subset_choice():
    labels = [0] * 50 + [1] * 30 + [2] * 2
    idx = balanced_subset_indices(labels, 20)
    counts = np.bincount(np.asarray(labels)[idx], minlength=3).tolist()
    assert counts == [9, 9, 2]  # class 2 runs out; its share goes to the others
    assert idx == sorted(set(idx)) and idx == balanced_subset_indices(labels, 20)
    assert balanced_subset_indices(labels, 100) == list(range(82))
    cfg = cfg_of("DATASET.TYPE", "synthetic", "DATASET.TRAIN_SUBSET", 105, "DATASET.TEST_SUBSET", 30)
    train, test, _ = build_datasets(cfg)
    assert len(train) == 105 and len(test) == 30
    assert sorted(np.bincount(train.targets).tolist()) == [10] * 5 + [11] * 5
    assert np.bincount(test.targets).tolist() == [3] * 10
    train2, _, _ = build_datasets(cfg_of("DATASET.TYPE", "synthetic", "DATASET.TRAIN_SUBSET", 105, "EXPERIMENT.SEED", 9))
    assert train.indices == train2.indices  # independent of the experiment seed
    assert "train 105 of 512" in dataset_description(cfg)


def _order(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader.sampler)


def test_train_order_is_a_function_of_seed_and_epoch():
    cfg = cfg_of("DATASET.TYPE", "synthetic", "EXPERIMENT.SEED", 3)
    a, _, _ = get_dataloaders(cfg)
    b, _, _ = get_dataloaders(cfg)
    c, _, _ = get_dataloaders(cfg_of("DATASET.TYPE", "synthetic", "EXPERIMENT.SEED", 4))
    assert isinstance(a.sampler, torch.utils.data.DistributedSampler) and a.drop_last and a.batch_size == 4
    assert _order(a, 0) == _order(b, 0) and _order(a, 1) == _order(b, 1)
    assert _order(a, 0) != _order(a, 1) and _order(a, 0) != _order(c, 0)
    assert sorted(_order(a, 0)) == list(range(512))
    b.sampler.set_epoch(1)
    a.sampler.set_epoch(1)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(a) == 512 // 4
    # two ranks split the training set
    r0, _, _ = get_dataloaders(cfg, rank=0, world_size=2)
    r1, _, _ = get_dataloaders(cfg, rank=1, world_size=2)
    s0, s1 = set(_order(r0, 0)), set(_order(r1, 0))
    assert not s0 & s1 and len(s0 | s1) == 512


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_val_sharding_covers_every_item_once(world_size):
    cfg = cfg_of("DATASET.TYPE", "synthetic", "DATASET.TEST_SUBSET", 100)
    seen = []
    for rank in range(world_size):
        _, val, _ = get_dataloaders(cfg, rank=rank, world_size=world_size)
        assert isinstance(val.sampler, ShardSampler) and len(val.sampler) == len(list(val.sampler))
        seen += list(val.sampler)
        assert sum(len(y) for _, y in val) == len(val.sampler)
    assert sorted(seen) == list(range(100))
    assert len(ShardSampler(2, rank=4, world_size=5)) == 0


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        build_datasets(cfg_of("DATASET.TYPE", "cifar10"))
    assert "cifar10" in str(e.value) and all(t in str(e.value) for t in DATASET_TYPES)
    with pytest.raises(ConfigError, match="TRAIN_SUBSET"):
        build_datasets(cfg_of("DATASET.TYPE", "synthetic", "DATASET.TRAIN_SUBSET", -1))
    with pytest.raises(ConfigError, match="SOLVER.BATCH_SIZE"):
        get_dataloaders(cfg_of("DATASET.TYPE", "synthetic", "DATASET.TRAIN_SUBSET", 3))


def test_description_names_type_root_sizes(tmp_path):
    make_fmnist(tmp_path / "fm")
    cfg = cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(tmp_path / "fm"), "DATASET.TEST_SUBSET", 10)
    line = dataset_description(cfg)  # builds when nothing was built yet
    assert line.startswith("fashion_mnist from ") and str(tmp_path / "fm") in line
    assert "train 60" in line and "test 10 of 30" in line and "10 classes" in line and "\n" not in line


def test_ranks_draw_distinct_augmentation_in_the_main_process():
    """NUM_WORKERS 0: each rank's crops and flips come from its own generator, not the shared global RNG."""
    from mdistiller_blockkd.data.common import PrivateRNGDataset
    from mdistiller_blockkd.utils.misc import get_rng_state, seed_everything, set_rng_state

    cfg = cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", "embedded", "DATASET.TRAIN_SUBSET", 64,
                 "DATASET.TEST_SUBSET", 20)
    items = list(range(8))

    def draws(rank):
        seed_everything(0)  # every rank seeds the global RNG alike (same model initialisation)
        loader, _, _ = get_dataloaders(cfg, rank=rank, world_size=2)
        assert isinstance(loader.dataset, PrivateRNGDataset)
        before = torch.get_rng_state()
        x = torch.stack([loader.dataset[i][0] for i in items])
        assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left as it was
        return x, loader

    x0, loader0 = draws(0)
    x1, _ = draws(1)
    assert not torch.equal(x0, x1)  # the same images, augmented differently on the two ranks
    x0_again, _ = draws(0)
    assert torch.equal(x0, x0_again)  # reproducible per rank
    # resume: the generator's state, saved with the rank's RNG snapshot, replays the same draws
    gens = {"augment": loader0.dataset.augment_generator}
    state = get_rng_state(generators=gens)
    a = torch.stack([loader0.dataset[i][0] for i in items])
    set_rng_state(state, generators=gens)
    assert torch.equal(a, torch.stack([loader0.dataset[i][0] for i in items]))
    # worker processes get their own seeds from the loader; the wrapper is for the main process only
    workers, _, _ = get_dataloaders(cfg_of("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", "embedded",
                                           "DATASET.NUM_WORKERS", 1), rank=1, world_size=2)
    assert not isinstance(workers.dataset, PrivateRNGDataset)


# ---------------------------------------------------------------- validation split (DATASET.VAL_SPLIT)


def test_val_split_is_held_out_balanced_fixed_and_unaugmented(tmp_path):
    from mdistiller_blockkd.data import build_splits, get_loaders

    root = tmp_path / "fm"
    make_fmnist(root, n_train=60, n_test=20)
    base = ("DATASET.TYPE", "fashion_mnist", "DATASET.ROOT", str(root))
    plain = build_splits(cfg_of(*base))
    assert plain.val is None and len(plain.train) == 60
    s = build_splits(cfg_of(*base, "DATASET.VAL_SPLIT", 20, "DATASET.TRAIN_SUBSET", 30))
    assert len(s.val) == 20 and len(s.train) == 30 and len(s.test) == 20
    # class-balanced, disjoint from the training items, identical whatever the experiment seed
    assert np.bincount(s.val.targets, minlength=10).tolist() == [2] * 10
    val_imgs = {bytes(im.tobytes()) for im in s.val.images}
    assert not val_imgs & {bytes(im.tobytes()) for im in s.train.images}
    again = build_splits(cfg_of(*base, "DATASET.VAL_SPLIT", 20, "EXPERIMENT.SEED", 7))
    assert np.array_equal(again.val.images, s.val.images)
    # test transform (deterministic), not the training augmentation
    assert s.val.transform is s.test.transform and s.train.transform is not s.test.transform
    x1, _ = s.val[3]
    x2, _ = s.val[3]
    assert torch.equal(x1, x2)
    loaders = get_loaders(cfg_of(*base, "DATASET.VAL_SPLIT", 20))
    assert loaders.val is not None and sum(len(b[1]) for b in loaders.val) == 20
    assert get_loaders(cfg_of(*base)).val is None
    assert "val 20 (held out of train)" in dataset_description(cfg_of(*base, "DATASET.VAL_SPLIT", 20))


def test_val_split_on_folder_and_synthetic_data(tmp_path):
    from mdistiller_blockkd.data import build_splits

    s = build_splits(cfg_of("DATASET.TYPE", "synthetic", "DATASET.VAL_SPLIT", 40))
    assert len(s.val) == 40 and len(s.train) == 512 - 40
    make_image_folder(tmp_path / "inet" / "train", ["n01", "n02"], 4)
    make_image_folder(tmp_path / "inet" / "val", ["n01", "n02"], 1)
    s = build_splits(cfg_of("DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path / "inet"),
                            "DATASET.IMAGE_SIZE", 16, "DATASET.VAL_SPLIT", 2))
    assert len(s.val) == 2 and len(s.train) == 6 and sorted(s.val.targets) == [0, 1]
    assert s.val.dataset.transform is s.test.transform


@pytest.mark.parametrize("n,match", [(-1, "DATASET.VAL_SPLIT is -1"), (400, "DATASET.VAL_SPLIT is 400")])
def test_val_split_errors(n, match):
    with pytest.raises(ConfigError, match=match):
        build_datasets(cfg_of("DATASET.TYPE", "synthetic", "DATASET.VAL_SPLIT", n))
