"""The training order as a function of the global step: which examples each process reads, derived from (seed, epoch,
step) alone, so that a run resumes on any number of processes without a per-process iterator state.

Every epoch is one permutation of the split, `np.random.default_rng([seed, epoch]).permutation(num_records)`, cut
into `steps_per_epoch = num_records // global_batch` global batches (the remainder is dropped). Global batch `k`
of an epoch is `order[k * G:(k + 1) * G]`, and a process takes its rows `[first_row, first_row + local_batch)` of
it, the rows its devices hold in the global array. The augmentation randomness is seeded by (seed, epoch, example),
so the global batch at a step is the same whatever the number of processes: each example is seen once per epoch
across all hosts, also over an epoch that straddles a topology change.
"""

from __future__ import annotations

import json
import threading

import grain.python as grain
import numpy as np

RECORD_FORMAT = 1


class EpochOrderSampler:
    """A grain sampler: local position `i` -> the record this process reads `i` records after global step `start`."""

    def __init__(
        self,
        num_records: int,
        global_batch: int,
        local_batch: int,
        first_row: int,
        seed: int,
        start_step: int,
        num_steps: int | None = None,
        worker_count: int = 0,
    ):
        self.num_records, self.global_batch, self.local_batch = num_records, global_batch, local_batch
        self.first_row, self.seed, self.start_step = first_row, seed, start_step
        self.steps_per_epoch = num_records // global_batch
        # grain's worker w reads indices w, w + W, w + 2W, ... and batches them itself; the loader then takes one
        # batch from each worker in turn. The index -> (step, row) map below undoes that, so that batch k is step k.
        self.worker_count = max(1, worker_count)
        # A finite stream (num_epochs) ends after a whole round of workers: at most W - 1 steps past num_steps.
        rounds = None if num_steps is None else -(-max(0, num_steps - start_step) // self.worker_count)
        self._length = 2**62 if rounds is None else rounds * self.worker_count * local_batch
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # grain pickles the sampler into its worker processes: no lock, no cache
        return {k: v for k, v in self.__dict__.items() if k not in ("_orders", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _orders={}, _lock=threading.Lock())

    def __len__(self) -> int:
        return self._length  # 2**62 (endless) unless the loader was given num_epochs

    def __repr__(self) -> str:
        return (
            f"EpochOrderSampler(num_records={self.num_records}, global_batch={self.global_batch}, "
            f"local_batch={self.local_batch}, first_row={self.first_row}, seed={self.seed})"
        )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the split for `epoch` (the last two are cached)."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                self._orders[epoch] = order
            return order

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} is past the last step")
        worker, position = index % self.worker_count, index // self.worker_count
        batch_of_worker, row = divmod(position, self.local_batch)
        step = batch_of_worker * self.worker_count + worker
        epoch, batch = divmod(self.start_step + step, self.steps_per_epoch)
        example = int(self.epoch_order(epoch)[batch * self.global_batch + self.first_row + row])
        # Seeded by the example and the epoch, not by the position in this process's stream: the same crop and
        # flip on any number of processes.
        rng = np.random.Generator(np.random.Philox(key=(self.seed << 64) | (epoch << 32) | example))
        return grain.RecordMetadata(index=index, record_key=example, rng=rng)


class StepIterator:
    """Batches of one process from global step `step` on; `get_state()` is the position record a checkpoint
    keeps, `set_state(record)` (or `seek(step)`) moves to another step. The grain iterator starts lazily, so a
    restore that seeks right away never starts (and discards) workers at step 0."""

    def __init__(
        self,
        make_loader,
        *,
        process_index: int,
        process_count: int,
        local_batch: int,
        seed: int,
        steps_per_epoch: int,
        step: int = 0,
    ):
        self._make_loader = make_loader
        self.process_index, self.process_count = process_index, process_count
        self.global_batch, self.local_batch = local_batch * process_count, local_batch
        self.seed, self.steps_per_epoch = seed, steps_per_epoch
        self.step = step
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = iter(self._make_loader(self.step))
        batch = next(self._iterator)
        self.step += 1
        return batch

    def seek(self, step: int) -> None:
        """Continues at global step `step` (the batches of steps step + 1, step + 2, ... come next)."""
        self.step, self._iterator = int(step), None

    def record(self, step: int | None = None, process_index: int | None = None) -> dict:
        """The position record of `process_index` (default this process) after `step` steps (default now)."""
        step = self.step if step is None else step
        process_index = self.process_index if process_index is None else process_index
        first_row = process_index * self.local_batch
        return {
            "format": RECORD_FORMAT,
            "step": int(step),
            "epoch": int(step // self.steps_per_epoch),
            "seed": int(self.seed),
            "global_batch": int(self.global_batch),
            "rows": [first_row, first_row + self.local_batch],
            "process_index": int(process_index),
            "process_count": int(self.process_count),
        }

    def record_bytes(self, step: int | None = None, process_index: int | None = None) -> bytes:
        """`record` as the canonical JSON bytes that checkpoints store and checksum."""
        return json.dumps(self.record(step, process_index), sort_keys=True).encode()

    def get_state(self) -> bytes:
        return self.record_bytes()

    def set_state(self, state: bytes) -> None:
        self.seek(json.loads(state)["step"])
