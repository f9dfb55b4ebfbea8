from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, needs_data
from lottery.data import DATASETS, Batches, Pool, Split, load_pool, split

DATA_ROOT = DATA  # $LOTTERY_DATA, else ../shared/data (tests/conftest.py)
needs_mnist = needs_data("MNIST", "raw")
needs_cifar = needs_data("cifar-10-batches-py")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def node(name, root=DATA_ROOT, **settings):
    """A `dataset` config node: nothing downloaded (the tests run offline)."""
    return {"name": name, "root": str(root), "download": False, **settings}


def synthetic(**settings):
    return {"name": "synthetic", **settings}


def load(dataset: dict, *, seed=0, split_seed=0, device="cpu") -> Split:
    """What a replicate trains on: the pool of `dataset` (drawn from `seed` for seeded data) and its validation
    split of `dataset.val_size` examples (from `split_seed`)."""
    return split(load_pool(dataset, device=device, seed=seed), dataset.get("val_size", 5000), split_seed)


@pytest.fixture(scope="module")
def mnist():
    return load(node("mnist"))


@pytest.fixture(scope="module")
def cifar():
    return load(node("cifar10", verify=False))


def train_set(s: Split):
    """The split's training examples, in the order of its training rows."""
    return s.pool.x[s.train_idx], s.pool.y[s.train_idx]


def indexed_data(n=100, shape=(3, 32, 32), augment=False, device="cpu") -> Split:
    """Random images whose label is their index, so a batch tells which samples it holds: all of them training rows
    (in pool order, so an index is a pool row too), no validation rows, the first 10 as test set."""
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, *shape, generator=g) + 0.5  # nonzero everywhere, so zero padding is recognisable
    y = torch.arange(n)
    pool = Pool(x.to(device), y.to(device), x[:10].to(device), y[:10].to(device), num_classes=n, input_shape=shape,
                augment=augment)
    return Split(pool, train_idx=torch.arange(n, device=device), val_idx=torch.arange(0, device=device))


# --- argument checking ---------------------------------------------------------------------------------------------

def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; accepted: cifar10, mnist, synthetic"):
        load_pool(node("imagenet"))
    assert sorted(DATASETS) == ["cifar10", "mnist", "synthetic"]


@pytest.mark.parametrize("val_size", [-1, 1.5, True, "100"])
def test_bad_val_size_rejected_before_loading(val_size, tmp_path):
    # tmp_path holds no data: a ValueError (not FileNotFoundError) shows validation ran first.
    with pytest.raises(ValueError, match="val_size"):
        load_pool(node("mnist", tmp_path, val_size=val_size))


@needs_mnist
@pytest.mark.parametrize("val_size", [60000, 70000])
def test_val_size_beyond_the_training_set_rejected(val_size):
    # The training set's size is known once it is loaded (the registry declares no sizes).
    with pytest.raises(ValueError, match=rf"dataset\.val_size must be in \[0, 60000\) for mnist .* got {val_size}"):
        load_pool(node("mnist", val_size=val_size))


@pytest.mark.parametrize("val_size", [500, 600])
def test_synthetic_val_size_beyond_the_training_set_rejected(val_size):
    with pytest.raises(ValueError, match=rf"dataset\.val_size must be in \[0, 500\) for synthetic .* got {val_size}"):
        load_pool(synthetic(val_size=val_size, synthetic_train=500))
    pool = load_pool(synthetic(val_size=0, synthetic_train=500))
    with pytest.raises(ValueError, match=rf"dataset\.val_size must be in \[0, 500\), got {val_size}"):
        split(pool, val_size, 0)
    with pytest.raises(ValueError, match=r"dataset\.val_size must be in \[0, 500\), got -1"):
        split(pool, -1, 0)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_root_message(name, folder, tmp_path):
    for root in (tmp_path / "does-not-exist", tmp_path):  # root missing, and root present but empty
        with pytest.raises(FileNotFoundError) as e:
            load_pool(node(name, root))
        msg = str(e.value)
        assert str(root.resolve()) in msg and "dataset.root=" in msg and folder in msg and "dataset.download=true" in msg


# --- real data -----------------------------------------------------------------------------------------------------

def check_split(s: Split, n_train, n_val, n_test, shape):
    train_x, train_y = train_set(s)
    val_x, val_y = s.val()
    test_x, test_y = s.test()
    assert s.n_train == n_train and len(s.val_idx) == n_val
    assert s.pool.x.shape == (n_train + n_val, *shape) and s.pool.y.shape == (n_train + n_val,)
    assert train_x.shape == (n_train, *shape) and train_y.shape == (n_train,)
    assert val_x.shape == (n_val, *shape) and val_y.shape == (n_val,)
    assert test_x.shape == (n_test, *shape) and test_y.shape == (n_test,)
    assert s.pool.input_shape == shape and s.pool.num_classes == 10
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert set(train_y.unique().tolist()) == set(range(10))
    # train and validation rows together are every pool row once
    assert torch.equal(torch.cat([s.train_idx, s.val_idx]).sort().values, torch.arange(n_train + n_val))


def rows_as_keys(x):
    return {hash(r.numpy().tobytes()) for r in x.flatten(1)}


def check_normalized(x):
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    assert torch.allclose(mean, torch.zeros_like(mean), atol=0.02), mean
    assert torch.allclose(std, torch.ones_like(std), atol=0.02), std


@needs_mnist
def test_mnist(mnist):
    check_split(mnist, 55000, 5000, 10000, (1, 28, 28))
    check_normalized(train_set(mnist)[0])
    # Disjoint: no validation image appears in the training set.
    train_keys = rows_as_keys(train_set(mnist)[0])
    val_keys = rows_as_keys(mnist.val()[0])
    assert not val_keys & train_keys


@needs_cifar
@pytest.mark.slow
def test_cifar(cifar):
    check_split(cifar, 45000, 5000, 10000, (3, 32, 32))
    check_normalized(train_set(cifar)[0])
    assert not rows_as_keys(cifar.val()[0]) & rows_as_keys(train_set(cifar)[0])


@needs_cifar
def test_cifar_verify_reports_md5():
    with pytest.raises(RuntimeError, match="md5") as e:
        load_pool(node("cifar10", verify=True))
    assert "dataset.verify=false" in str(e.value)


@needs_mnist
def test_split_prefix(mnist):
    # Same seed, smaller val_size: the first 100 indices of the same permutation.
    small = load(node("mnist", val_size=100))
    assert torch.equal(small.val()[0], mnist.val()[0][:100]) and small.n_train == 59900
    assert torch.equal(small.val_idx, mnist.val_idx[:100])


def test_split_is_seeded():
    def load_(**kw):
        return load(synthetic(val_size=100, synthetic_train=500), **kw)
    a, b, c = load_(), load_(), load_(split_seed=1)
    assert torch.equal(a.val()[0], b.val()[0]) and not torch.equal(a.val()[0], c.val()[0])
    assert torch.equal(a.val()[1], b.val()[1])
    none = load(synthetic(val_size=0, synthetic_train=500))
    assert none.val()[0].shape == (0, 1, 28, 28) and none.val()[1].shape == (0,) and none.n_train == 500
    # Together, validation and training hold each original sample exactly once.
    def sort_rows(x):
        x = x.flatten(1)
        return x[x[:, 0].argsort()]
    assert torch.equal(sort_rows(torch.cat([a.val()[0], train_set(a)[0]])), sort_rows(train_set(none)[0]))


# --- synthetic -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,expected", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_synthetic_shapes_and_determinism(shape, expected):
    dataset = synthetic(root="/ignored", val_size=100, synthetic_shape=shape, synthetic_train=500, synthetic_test=50)
    a = load(dataset)
    check_split(a, 400, 100, 50, expected)
    b = load(dataset)
    c = load(dataset, seed=1)

    def parts(s):
        return (*train_set(s), *s.val(), *s.test())
    assert all(torch.equal(u, v) for u, v in zip(parts(a), parts(b)))
    assert not torch.equal(train_set(a)[0], train_set(c)[0])


def test_synthetic_is_learnable():
    d = load(synthetic(val_size=0))
    train_x, train_y = train_set(d)
    test_x, test_y = d.test()
    centroids = torch.stack([train_x[train_y == k].mean(0) for k in range(10)]).flatten(1)
    assert torch.cdist(centroids, centroids).add(torch.eye(10) * 1e9).min() > 10  # prototypes well apart
    pred = torch.cdist(test_x.flatten(1), centroids).argmin(1)
    assert (pred == test_y).float().mean() > 0.9


def test_synthetic_bad_shape():
    with pytest.raises(ValueError, match="synthetic_shape"):
        load_pool(synthetic(synthetic_shape="imagenet"))


# --- batches -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_batches_deterministic_and_resumable(device):
    d = indexed_data(device=device, augment=True)
    a = Batches(d, batch_size=16, seed=7)
    seq = [a.get(t) for t in range(20)]
    b = Batches(d, batch_size=16, seed=7)
    for t in reversed(range(20)):  # out of order, crossing epochs both ways
        assert all(torch.equal(u, v) for u, v in zip(b.get(t), seq[t]))
    # A resumed run asks for a far step directly.
    far = a.get(1234)
    assert all(torch.equal(u, v) for u, v in zip(Batches(d, 16, 7).get(1234), far))
    other = Batches(d, 16, 8)
    assert not torch.equal(other.get(0)[1], seq[0][1])
    assert all(x.device.type == device for x in far)
    # iterating gives the batches of steps 0, 1, 2, ...
    it = iter(Batches(d, 16, 7))
    for t in range(8):
        assert all(torch.equal(u, v) for u, v in zip(next(it), seq[t]))


@pytest.mark.parametrize("n,bs", [(100, 10), (100, 16)])
def test_each_epoch_visits_each_sample_once(n, bs):
    d = indexed_data(n=n)
    b = Batches(d, bs, seed=0)
    assert b.steps_per_epoch == n // bs
    epochs = []
    for e in range(3):
        ids = torch.cat([b.get(e * b.steps_per_epoch + i)[1] for i in range(b.steps_per_epoch)])
        assert len(ids) == len(set(ids.tolist())) == (n // bs) * bs
        epochs.append(ids)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_unaugmented_batches_are_stored_tensors():
    d = indexed_data()
    b = Batches(d, 32, seed=3)
    x, y = b.get(5)
    assert torch.equal(x, d.pool.x[y]) and torch.equal(y, d.pool.y[y])
    assert torch.equal(b.rows(5), y)  # the pool rows of the batch


def test_batches_read_only_the_training_rows():
    """A split's batches hold its training rows, never its validation rows: each epoch is its training rows once."""
    s = load(synthetic(val_size=100, synthetic_train=500))
    b = Batches(s, 50, seed=0)
    assert b.steps_per_epoch == 8
    rows = torch.cat([b.rows(t) for t in range(b.steps_per_epoch)])
    assert len(set(rows.tolist())) == 400 and set(rows.tolist()) <= set(s.train_idx.tolist())
    x, y = b.get(3)
    assert torch.equal(x, s.pool.x[b.rows(3)]) and torch.equal(y, s.pool.y[b.rows(3)])


def flip_crop_matches(x, src, pad=4):
    """(N, 2 * 81) bool: which flip/offset candidates of src equal x; unflipped first, offsets row-major."""
    n, c, h, w = src.shape
    padded = F.pad(torch.stack([src, src.flip(-1)], 1), (pad,) * 4)
    candidates = padded.unfold(3, h, 1).unfold(4, w, 1)  # N, 2, C, 9, 9, H, W (a view)
    return (candidates == x[:, None, :, None, None]).all(-1).all(-1).all(2).flatten(1)


def test_augmentation_pads_with_normalized_black_as_torchvision():
    """torchvision's RandomCrop(padding=4) pads the raw image with black before Normalize: our on-device augmentation
    of normalized images must give exactly those pixels (black = -mean/std per channel, not 0)."""
    from dataclasses import replace

    from lottery.data import black
    from lottery.data.pool import _to_device
    from lottery.data.sources import CIFAR10_STATS
    stats = CIFAR10_STATS
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    d = indexed_data(n=64, shape=(3, 32, 32), augment=True)
    d = replace(d, pool=replace(d.pool, x=_to_device(raw, stats, "cpu"), pad_value=black(stats)))
    assert torch.allclose(black(stats), -torch.tensor(stats[0]) / torch.tensor(stats[1]))
    x, y = Batches(d, 64, seed=0).get(0)
    # candidates: every flip/crop of the raw image padded with byte 0, then normalized like the dataset
    padded_raw = F.pad(raw[y], (4,) * 4)
    normalized = _to_device(torch.stack([padded_raw, padded_raw.flip(-1)], 1).flatten(0, 1), stats, "cpu")
    normalized = normalized.view(64, 2, 3, 40, 40)
    candidates = normalized.unfold(3, 32, 1).unfold(4, 32, 1)
    match = (candidates == x[:, None, :, None, None]).all(-1).all(-1).all(2).flatten(1)
    assert match.any(1).all(), "an augmented image is not a flip/crop of its black-padded source"
    which = match.float().argmax(1) % 81
    assert (which != 40).float().mean() > 0.8  # mostly shifted crops: the padding is in the comparison


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_augmentation(device, shape):
    n = 128
    d = indexed_data(n=n, shape=shape, augment=True, device=device)
    b = Batches(d, n, seed=0)
    x, y = b.get(0)
    assert x.shape == (n, *shape) and x.dtype == torch.float32 and x.device == d.pool.x.device
    x, y = x.cpu(), y.cpu()
    match = flip_crop_matches(x, d.pool.x.cpu()[y])
    assert match.any(1).all(), "an augmented image is not a flip/crop of its source"
    which = match.float().argmax(1)
    flipped, offset = which // 81, which % 81
    assert 0.3 < flipped.float().mean() < 0.7  # both flipped and unflipped occur
    assert (offset != 40).float().mean() > 0.8  # offset 40 is (4, 4), the uncropped position
    assert len(offset.unique()) > 30

    # Each step (here each step is a whole epoch) and each seed draws fresh augmentations.
    def by_sample(batch):
        return batch[0].cpu()[batch[1].cpu().argsort()]
    assert not torch.equal(by_sample(b.get(1)), by_sample((x, y)))
    assert not torch.equal(by_sample(Batches(d, n, seed=1).get(0)), by_sample((x, y)))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    d = load(synthetic(val_size=100, synthetic_shape="cifar10", augment=True))
    b = Batches(d, 64, seed=0)
    for t in range(b.steps_per_epoch + 2):
        b.get(t)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_batch_size():
    d = indexed_data(n=10)
    for bs in (0, 11):
        with pytest.raises(ValueError, match=rf"train\.batch_size must be in \[1, 10\] \(the training set size\), "
                                             rf"got {bs}"):
            Batches(d, bs, seed=0)


@needs_mnist
def test_mnist_fast_reader_matches_torchvision():
    """MNIST on disk is read without importing torchvision (1.3 s of startup); it must equal torchvision's reading."""
    from torchvision.datasets import MNIST

    from lottery.data.sources import _load_mnist
    train_x, train_y, test_x, test_y = _load_mnist(str(DATA_ROOT), download=False)
    tv_train, tv_test = MNIST(str(DATA_ROOT), train=True), MNIST(str(DATA_ROOT), train=False)
    assert torch.equal(train_x[:, 0], tv_train.data) and torch.equal(train_y, tv_train.targets)
    assert torch.equal(test_x[:, 0], tv_test.data) and torch.equal(test_y, tv_test.targets)



def test_the_real_data_folder_comes_from_lottery_data(tmp_path):
    """The real-data tests read $LOTTERY_DATA (a user's data folder), else the development layout's ../shared/data."""
    from conftest import REPO, data_root
    assert data_root({"LOTTERY_DATA": str(tmp_path)}) == tmp_path
    assert data_root({"LOTTERY_DATA": "~/data"}) == Path.home() / "data"
    assert data_root({}) == REPO.parent / "shared" / "data"
