"""The training order is a function of the global step: the same global batches on any number of processes, and each
example once per epoch across a topology change (resnext_jax/data/train_order.py)."""

import collections

import numpy as np
import pytest

from resnext_jax.data import create_train_loader, prepare_dataset
from resnext_jax.data.digits import digits_images_and_labels

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # normalize() becomes the identity on 0..255
GLOBAL_BATCH = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    prepare_dataset("digits", path)
    return path


def _iterators(data_dir, process_count, step, **kwargs):
    """One iterator per process of a `process_count`-process run, each moved to global step `step`."""
    iterators, image_size = [], kwargs.pop("image_size", 16)
    for index in range(process_count):
        loader = create_train_loader(
            "digits",
            data_dir=data_dir,
            batch_size=GLOBAL_BATCH // process_count,
            image_size=image_size,
            process_index=index,
            process_count=process_count,
            **kwargs,
        )
        iterator = iter(loader)
        iterator.seek(step)
        iterators.append(iterator)
    return iterators


def _global_batch(iterators) -> dict:
    """The global batch as the mesh assembles it: process p's rows after process p - 1's."""
    batches = [next(iterator) for iterator in iterators]
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


@pytest.mark.parametrize("step", [0, 57, 58])  # 59 steps per epoch: the last of epoch 1, the first of epoch 2
def test_the_global_batch_at_a_step_is_the_same_on_any_number_of_processes(data_dir, step):
    # Random crops, flips and RandAugment: the randomness follows the example and the epoch, not the process.
    kwargs = dict(transform="imagenet", augment="randaugment", seed=5)
    expected = _global_batch(_iterators(data_dir, 1, step, **kwargs))
    for process_count in (2, 3, 4):
        got = _global_batch(_iterators(data_dir, process_count, step, **kwargs))
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    # Not vacuous: another seed, or the next step, gives other batches.
    other = _global_batch(_iterators(data_dir, 1, step, **{**kwargs, "seed": 6}))
    assert not np.array_equal(other["image"], expected["image"])
    assert not np.array_equal(_global_batch(_iterators(data_dir, 1, step + 1, **kwargs))["image"], expected["image"])


def test_each_example_is_seen_once_per_epoch_across_a_topology_change(data_dir):
    images, _, is_test = digits_images_and_labels()
    train = collections.Counter(np.asarray(image, np.uint8).tobytes() for image in images[~is_test])
    seen = collections.Counter()
    # Steps 1-20 of epoch 1 on 2 processes, then a resume on 3 processes from step 20 to the epoch's end (59).
    for process_count, start, stop in ((2, 0, 20), (3, 20, 59)):
        iterators = _iterators(data_dir, process_count, start, transform="none", image_size=32, seed=1, **RAW)
        for _ in range(start, stop):
            batch = _global_batch(iterators)
            seen.update(np.asarray(np.round(image), np.uint8).tobytes() for image in batch["image"])
    assert sum(seen.values()) == 59 * GLOBAL_BATCH  # 1437 // 24 global batches; 21 examples wait for the next epoch
    assert not seen - train  # no example twice (and nothing that is not a training example)
    # The next epoch starts a new permutation of the whole split.
    (iterator,) = _iterators(data_dir, 1, 59, transform="none", image_size=32, seed=1, **RAW)
    first_of_epoch_2 = next(iterator)["label"]
    (iterator,) = _iterators(data_dir, 1, 0, transform="none", image_size=32, seed=1, **RAW)
    assert not np.array_equal(first_of_epoch_2, next(iterator)["label"])


def test_host_times_report_the_slowest_and_fastest_process(monkeypatch):
    from resnext_jax.training import distributed

    clock = iter([0.0, 1.0, 1.5, 2.0, 2.1, 4.0, 4.0, 6.0, 6.0])  # start; 2 x next(); 2 x (gather, new window)
    monkeypatch.setattr(distributed.time, "perf_counter", lambda: next(clock))
    others = np.array([[0.5, 0.1], [3.0, 0.9]])  # two more processes: a fast one and one starved of data

    sent = []

    def allgather(mine):
        sent.append(mine)
        return np.concatenate([mine[None], others])

    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 3)
    times = distributed.HostTimes()
    batches = iter([{"x": 1}, {"x": 2}])
    assert [times.next(batches), times.next(batches)] == [{"x": 1}, {"x": 2}]
    # This process: 4 s for 2 steps (2 s per step), 0.6 s of it waiting for data (0.15).
    got = times.gather()
    np.testing.assert_allclose(sent[0], [2.0, 0.15])
    assert got == {"host_step_s_max": 3.0, "host_step_s_min": 0.5, "host_data_wait_max": 0.9}
    others[:] = [[2.0, 0.0], [2.0, 0.0]]
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", lambda mine: np.stack([mine] * 3))
    assert times.gather()["host_data_wait_max"] == 0.0  # a new window: nothing waited since the last gather


def test_the_runtime_fatal_report_names_the_lost_process():
    from resnext_jax.training.peers import lost_process

    prefix = b"F1207 20:53:56.571114   22017 client.h:80] Terminating process because the JAX distributed service "
    # Reports seen in tests/test_multihost_chaos.py's runs (and the service's log), one per way a peer is found lost.
    assert lost_process(prefix + b"absl::Status: UNAVAILABLE: Task 2 heartbeat timeout. This indicates", 1) == 2
    unhealthy = b"UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have"
    assert lost_process(prefix + unhealthy, 0) == 1
    leader = b"absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was"
    assert lost_process(prefix + leader, 2) == 0
    assert lost_process(prefix + leader, 0) == "another"


def test_worker_processes_give_the_same_batches_from_any_step(data_dir):
    # grain's workers batch their own share of the records; the sampler's order undoes it (step k is batch k).
    kwargs = dict(transform="imagenet", seed=2)
    for step in (0, 3):
        (inline,) = _iterators(data_dir, 1, step, **kwargs)
        (workers,) = _iterators(data_dir, 1, step, worker_count=2, **kwargs)
        for _ in range(3):
            np.testing.assert_array_equal(next(workers)["image"], next(inline)["image"])
