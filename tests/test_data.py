"""Loaders on the embedded `digits` dataset: build offline, sharding, eval coverage, resumable iterator state."""

import collections
import json

import numpy as np
import pytest

from resnext_jax.data import create_eval_loader, create_train_loader, dataset_info, mixup_cutmix, prepare_dataset
from resnext_jax.data.digits import digits_images_and_labels
from resnext_jax.data.loaders import eval_shard_indices

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # normalize() becomes the identity on 0..255


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    prepare_dataset("digits", path)
    return path


@pytest.fixture(scope="module")
def reference():
    images, labels, is_test = digits_images_and_labels()
    return images, labels, is_test


def _keys(images) -> list[bytes]:
    return [np.asarray(np.round(image), np.uint8).tobytes() for image in images]


def test_digits_builds_offline_with_expected_content(data_dir, reference):
    from sklearn.datasets import load_digits

    images, labels, is_test = reference
    info = dataset_info("digits", data_dir)
    assert (info.num_train, info.num_eval, info.num_classes, info.image_size) == (1437, 360, 10, 32)
    # The upsampled images still carry sklearn's digits in sklearn's order: the centre 2x2 of each 4x4 block sits
    # near the original pixel's centre. A shuffled order would be far off.
    centres = images[..., 0].reshape(-1, 8, 4, 8, 4)[:, :, 1:3, :, 1:3].mean(axis=(2, 4))
    originals = load_digits().images * 255 / 16
    assert np.abs(centres - originals).mean() < 12
    assert np.abs(centres - originals[::-1]).mean() > 40
    # The recorded normalization constants are the train split's statistics.
    train = images[~is_test].astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, train.mean(axis=(0, 1, 2)), atol=1e-3)
    np.testing.assert_allclose(info.std, train.std(axis=(0, 1, 2)), atol=1e-3)
    # Every test example comes back from the ArrayRecord files exactly once, with its label.
    batches = list(create_eval_loader("digits", data_dir=data_dir, batch_size=128, image_size=32, **RAW))
    loaded = collections.Counter(
        (key, int(label))
        for batch in batches
        for key, label, mask in zip(_keys(batch["image"]), batch["label"], batch["mask"])
        if mask
    )
    expected = collections.Counter(zip(_keys(images[is_test]), labels[is_test].tolist()))
    assert loaded == expected


def test_unprepared_dataset_fails_fast_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*cifar-10-binary.tar.gz.*prepare cifar10 --from"):
        dataset_info("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_val.tar.*prepare imagenet2012 --from DIR"):
        dataset_info("imagenet2012", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown dataset 'mnist_typo'.*prepare folder DIR --name mnist_typo"):
        dataset_info("mnist_typo", str(tmp_path))


def test_train_sharding_is_disjoint_and_covers_the_split(data_dir, reference):
    images, _, is_test = reference
    per_process = []
    for process_index in range(2):
        loader = create_train_loader(
            "digits",
            data_dir=data_dir,
            batch_size=2,
            image_size=32,
            transform="none",
            num_epochs=1,
            process_index=process_index,
            process_count=2,
            **RAW,
        )
        per_process.append(collections.Counter(key for batch in loader for key in _keys(batch["image"])))
    assert sum(per_process[0].values()) == sum(per_process[1].values()) == 1437 // 2
    # No record is read twice: the combined counts never exceed the split's own counts.
    combined = per_process[0] + per_process[1]
    assert not combined - collections.Counter(_keys(images[~is_test]))
    assert sum(combined.values()) == 1436  # one record is dropped to keep the shards equal


@pytest.mark.parametrize("num_examples,batch_size,process_count", [(360, 128, 2), (10, 4, 3), (7, 8, 2)])
def test_eval_shards_pad_to_equal_batches_and_cover_once(num_examples, batch_size, process_count):
    shards = [eval_shard_indices(num_examples, batch_size, index, process_count) for index in range(process_count)]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) % batch_size == 0
    real = np.concatenate([shard[shard >= 0] for shard in shards])
    np.testing.assert_array_equal(np.sort(real), np.arange(num_examples))


def test_eval_loader_two_processes_cover_every_example_once(data_dir, reference):
    images, _, is_test = reference
    loaders = [
        create_eval_loader(
            "digits", data_dir=data_dir, batch_size=64, image_size=32, process_index=index, process_count=2, **RAW
        )
        for index in range(2)
    ]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == 3  # 180 per process -> 3 batches of 64
    seen = collections.Counter()
    for batch in batches[0] + batches[1]:
        assert batch["image"].shape == (64, 32, 32, 3) and batch["mask"].dtype == np.bool_
        seen.update(key for key, mask in zip(_keys(batch["image"]), batch["mask"]) if mask)
        assert not batch["image"][~batch["mask"]].any() or batch["mask"].all()
    assert seen == collections.Counter(_keys(images[is_test]))


def test_restored_iterator_replays_the_same_batches(data_dir):
    kwargs = dict(data_dir=data_dir, batch_size=64, image_size=32, transform="imagenet", augment="randaugment", seed=3)
    iterator = iter(create_train_loader("digits", **kwargs))
    for _ in range(20):  # 22 batches per epoch, so the replay below crosses an epoch boundary
        next(iterator)
    state = iterator.get_state()
    json.loads(state)  # plain JSON bytes: storable in any checkpoint
    expected = [next(iterator) for _ in range(4)]

    restored = iter(create_train_loader("digits", **kwargs))
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    # A different seed really changes the stream, so the equality above is not vacuous.
    other = next(iter(create_train_loader("digits", **{**kwargs, "seed": 4})))
    assert not np.array_equal(other["label"], next(iter(create_train_loader("digits", **kwargs)))["label"])


def test_train_batches_have_the_promised_types(data_dir):
    info = dataset_info("digits", data_dir)
    batch = next(
        iter(create_train_loader("digits", data_dir=data_dir, batch_size=16, image_size=24, transform="cifar"))
    )
    assert batch["image"].shape == (16, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (16,)
    lowest = (0 - np.array(info.mean)) / np.array(info.std)
    highest = (1 - np.array(info.mean)) / np.array(info.std)
    assert (batch["image"] >= lowest - 1e-5).all() and (batch["image"] <= highest + 1e-5).all()


def test_mixup_is_a_convex_combination_matching_its_labels():
    import jax

    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    labels = np.arange(6)
    mixed, targets = jax.jit(mixup_cutmix, static_argnums=(3,), static_argnames=("mixup_alpha",))(
        jax.random.key(1), images, labels, 6, mixup_alpha=0.4
    )
    lam = float(targets[0, 0])
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 5], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_labels_match_the_pasted_area(seed):
    import jax

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    mixed, targets = mixup_cutmix(jax.random.key(seed), images, np.arange(4), 4, cutmix_alpha=1.0, label_smoothing=0.1)
    mixed = np.asarray(mixed)
    from_partner = np.all(mixed == images[::-1], axis=-1)
    assert np.all(from_partner | np.all(mixed == images, axis=-1))  # every pixel is one image or the other
    lam = 1 - from_partner[0].mean()
    off = 0.1 / 4
    np.testing.assert_allclose(targets[0, 0], lam * (0.9 + off) + (1 - lam) * off, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_restore_with_worker_processes(data_dir):
    kwargs = dict(data_dir=data_dir, batch_size=32, image_size=32, transform="imagenet", seed=5, worker_count=2)
    iterator = iter(create_train_loader("digits", **kwargs))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["label"] for _ in range(3)]
    restored = iter(create_train_loader("digits", **kwargs))
    restored.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(restored)["label"], want)
