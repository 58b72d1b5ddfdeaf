"""Preparing datasets without TensorFlow: `python -m resnext_jax.data.prepare {folder,cifar10,...} ...`.

Each command streams its input (an image folder or the original archives), checks every image in worker
processes, and writes TFDS's ArrayRecord layout atomically (see `writer`), which `resnext_jax.data` then reads
by name. See docs/data.md.
"""
