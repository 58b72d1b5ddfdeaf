"""Times `prepare folder` on a synthetic folder of JPEGs and reports images/s and peak memory.

    python -m resnext_jax.benchmarks.prepare --images 20000 --dir /tmp/prepare_bench

The folder (10 classes of 500x375 JPEGs, quality 90, smooth random content of about a real photo's size) is made
once and reused. The prepare command runs as a child process, as a user would run it; its memory is sampled every
0.2 s with psutil: the main process's peak RSS (what grows if preparing is not streamed) and the peak of the sum
over the process and its workers (which counts the workers' shared pages once per worker).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

WIDTH, HEIGHT, CLASSES = 500, 375, 10


def _make_image(index: int) -> tuple[str, bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(index)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC)
    noise = rng.integers(-12, 12, (HEIGHT, WIDTH, 3))
    pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return f"class_{index % CLASSES:02d}/{index:06d}.jpg", buffer.getvalue()


def make_folder(root: str, count: int) -> None:
    """Writes `count` synthetic JPEGs under root/class_NN/ unless they are already there."""
    marker = os.path.join(root, f".complete-{count}")
    if os.path.exists(marker):
        return
    shutil.rmtree(root, ignore_errors=True)
    for label in range(CLASSES):
        os.makedirs(os.path.join(root, f"class_{label:02d}"))
    with multiprocessing.get_context("forkserver").Pool() as pool:
        for relative, data in pool.imap_unordered(_make_image, range(count), chunksize=64):
            with open(os.path.join(root, relative), "wb") as file:
                file.write(data)
    open(marker, "w").close()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(root: str, workers: int) -> dict:
    """Prepares `root` into a temporary data dir in a child process; returns its timing and memory peaks."""
    import psutil

    data_dir = tempfile.mkdtemp(prefix="prepare_bench_")
    command = [
        sys.executable,
        "-m",
        "resnext_jax.data.prepare",
        "folder",
        root,
        "--name",
        "bench",
        "--data-dir",
        data_dir,
        "--workers",
        str(workers),
        "--quiet",
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command)
    process = psutil.Process(child.pid)
    main_peak = tree_peak = 0
    while child.poll() is None:
        try:
            main = process.memory_info().rss
            tree = main + sum(p.memory_info().rss for p in process.children(recursive=True))
        except psutil.Error:
            continue
        main_peak, tree_peak = max(main_peak, main), max(tree_peak, tree)
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"prepare failed with exit code {child.returncode}")
    size = sum(os.path.getsize(os.path.join(path, name)) for path, _, names in os.walk(data_dir) for name in names)
    shutil.rmtree(data_dir)
    return {
        "command": " ".join(command),
        "seconds": seconds,
        "main_peak_mib": main_peak / 2**20,
        "tree_peak_mib": tree_peak / 2**20,
        "output_mib": size / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "prepare_bench"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    root = os.path.join(args.dir, f"folder_{args.images}")
    made = time.perf_counter()
    make_folder(root, args.images)
    print(
        f"folder: {args.images} JPEGs of {WIDTH}x{HEIGHT} in {root} (made or found in "
        f"{time.perf_counter() - made:.0f} s)"
    )
    result = run(root, args.workers)
    print(f"command: {result['command']}")
    print(
        f"{args.images / result['seconds']:.0f} images/s ({result['seconds']:.1f} s, {args.workers} workers); "
        f"peak RSS {result['main_peak_mib']:.0f} MiB (main process), {result['tree_peak_mib']:.0f} MiB (with "
        f"workers); output {result['output_mib']:.0f} MiB"
    )
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; {datetime.date.today().isoformat()}; "
        f"bench: python -m resnext_jax.benchmarks.prepare --images {args.images} --workers {args.workers}"
    )


if __name__ == "__main__":
    main()
