"""The streaming loop every `prepare` command shares: items in, checked in worker processes, written in order.

Memory stays flat in the number of images: at most `2 * workers` chunks of `CHUNK` items are in flight, and the
writer keeps three numbers per written example. Workers are forked (they start in milliseconds), except in a
process whose JAX runtime is running (a test, a notebook): its threads must not be forked, so a forkserver starts
them there. Workers ignore Ctrl-C, which the parent handles by removing the partial output.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import shlex
import signal
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from resnext_jax.data.prepare import images

CHUNK = 32


@dataclasses.dataclass
class Item:
    """One example to write: `source` is a path, encoded bytes or a uint8 array (see `images.load_item`)."""

    split: str
    key: str  # unique in its split; it decides the stored order (see writer.py)
    label: int
    source: object
    name: str  # what the summary calls it (a path or an archive member)
    extra: dict = dataclasses.field(default_factory=dict)  # further features, e.g. {'file_name': ...}


@dataclasses.dataclass
class Report:
    """What a prepare run did, for the end summary and for tests."""

    class_names: list[str]
    written: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)  # split -> label -> n
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why)
    ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # why -> n
    ignored_examples: dict[str, str] = dataclasses.field(default_factory=dict)  # why -> one name
    # The decoder's notes (16-bit or float images scaled to 8 bits, as training and predict decode them): note -> n
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    note_examples: dict[str, str] = dataclasses.field(default_factory=dict)  # note -> one name
    stats: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(7))
    num_bytes: int = 0
    seconds: float = 0.0
    target: str = ""  # the dataset directory written

    def ignore(self, why: str, name: str) -> None:
        self.ignored[why] += 1
        self.ignored_examples.setdefault(why, name)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel mean and std of the train images (on the 0-1 scale), from the checked pixels."""
        count = max(self.stats[6], 1.0)
        mean = self.stats[:3] / count
        std = np.sqrt(np.maximum(self.stats[3:6] / count - mean**2, 0.0))
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)

    def summary(self, target: str, max_listed: int = 20) -> str:
        """The end-of-run text: examples per split and class, skipped and ignored files, bytes and time."""
        lines = [f"wrote {target} in {self.seconds:.1f} s, {self.num_bytes / 2**20:.1f} MiB"]
        for split, counts in self.written.items():
            total = sum(counts.values())
            per_class = ", ".join(f"{self.class_names[label]} {counts[label]}" for label in sorted(counts))
            lines.append(f"  {split}: {total} examples ({per_class})")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unusable file(s):")
            lines += [f"    {name}: {why}" for name, why in self.skipped[:max_listed]]
            if len(self.skipped) > max_listed:
                lines.append(f"    ... and {len(self.skipped) - max_listed} more")
        for why, count in sorted(self.ignored.items()):
            lines.append(f"  ignored {count} {why} (e.g. {self.ignored_examples[why]})")
        for note, count in sorted(self.notes.items()):
            lines.append(
                f"  note: {count} image(s): {note}, as training and predict decode them "
                f"(e.g. {self.note_examples[note]})"
            )
        return "\n".join(lines)


def rerun_command(command: str, *arguments: str, data_dir: str) -> str:
    """The command line that prepares the same dataset again; stored with it, so that the error for a damaged
    file can give it."""
    return shlex.join(
        ["python", "-m", "resnext_jax.data.prepare", command, *arguments, "--data-dir", os.path.abspath(data_dir)]
    )


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_method() -> str:
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "_backends", None):  # JAX's runtime threads are running
        return "forkserver"
    return "fork"


def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _loaded(items: Iterable[Item], workers: int) -> Iterator[tuple[Item, tuple]]:
    """Yields (item, images.load_item(item.source)) in input order, loading in `workers` processes."""
    if workers <= 0:
        for item in items:
            yield item, images.load_item(item.source)
        return
    context = multiprocessing.get_context(_start_method())
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["resnext_jax.data.prepare.images"])
    pool = context.Pool(workers, initializer=_ignore_interrupts)
    try:
        pending = collections.deque()
        for chunk in _chunks(items):
            pending.append((chunk, pool.apply_async(images.load_items, ([item.source for item in chunk],))))
            if len(pending) >= 2 * workers:
                yield from _with_bytes(*pending.popleft())
        while pending:
            yield from _with_bytes(*pending.popleft())
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _with_bytes(chunk: list[Item], result) -> Iterator[tuple[Item, tuple]]:
    """Pairs a chunk with its workers' results, restoring the encoded bytes `images.load_items` did not send back."""
    for item, (data, problem, stats, note) in zip(chunk, result.get()):
        if data is None and problem is None:
            data = item.source
        yield item, (data, problem, stats, note)


def write_items(
    writer,
    items: Iterable[Item],
    report: Report,
    *,
    workers: int,
    total: int | None = None,
    stats_split: str | None = None,
    quiet: bool = False,
) -> None:
    """Checks and writes `items` (each into its own split) with the DatasetWriter, recording what happened.

    Unusable images are skipped and listed in the report. Images of `stats_split` feed the normalization
    statistics. One pass serves every split, so an archive that holds both is read once.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=f"preparing {writer.display_name}",
        unit=" img",
        file=sys.stderr,
        disable=quiet,
        dynamic_ncols=True,
        leave=False,
    )
    with bar:
        for item, (data, problem, stats, note) in _loaded(items, workers):
            bar.update(1)
            if problem:
                report.skipped.append((item.name, problem))
                continue
            if note:
                report.notes[note] += 1
                report.note_examples.setdefault(note, item.name)
            example = {"image": data, "label": item.label, **item.extra}
            report.num_bytes += writer.split(item.split).add(item.key, example)
            report.written.setdefault(item.split, collections.Counter())[item.label] += 1
            if item.split == stats_split:
                report.stats += stats
