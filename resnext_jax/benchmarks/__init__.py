"""Benchmark command lines: each prints its numbers and the exact command that made them (docs/benchmarks.md).

    python -m resnext_jax.benchmarks.step     a model's train or inference step against torchvision's, same process
    python -m resnext_jax.benchmarks.conv     the grouped-conv implementations, shape by shape, against torch
    python -m resnext_jax.benchmarks.data     the ImageNet train input pipeline against torchvision's DataLoader
    python -m resnext_jax.benchmarks.prepare  `python -m resnext_jax.data.prepare folder`: images/s and peak memory

Scripts that compare revisions or take a step apart (A/B timing, the step's floors, the GPU suite) live in the
repository's `benchmarks/` folder and reuse these modules' helpers.
"""
