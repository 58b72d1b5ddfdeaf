"""`resnext_jax.cpu`'s interface: the build's one log line, `eligible` and `report()`, and the command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp

from resnext_jax import cpu
from resnext_jax.cpu import build


def test_a_fresh_build_logs_one_line_and_a_cached_one_none(tmp_path, monkeypatch, caplog):
    """The compiler is replaced by a stand-in that writes the library: what is checked is the bookkeeping around
    it (one line naming compiler, instruction set, seconds and path; nothing when the cache has it)."""

    def fake_run(command, capture_output=True, text=True):
        if "--version" in command:
            return types.SimpleNamespace(returncode=0, stdout="g++ (fake) 13.2\n", stderr="")
        with open(command[command.index("-o") + 1], "wb") as f:
            f.write(b"not a library")
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setenv("RESNEXT_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(build.subprocess, "run", fake_run)
    monkeypatch.setattr(build, "BUILD", {})
    with caplog.at_level(logging.INFO, logger="resnext_jax"):
        path = build._build("/usr/bin/g++", "avx2")
    lines = [r.getMessage() for r in caplog.records if r.name == "resnext_jax"]
    assert len(lines) == 1, lines
    assert "g++" in lines[0] and "avx2" in lines[0] and path in lines[0] and " s into " in lines[0]
    assert os.path.dirname(path) == str(tmp_path) and build.BUILD["cached"] is False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnext_jax"):
        assert build._build("/usr/bin/g++", "avx2") == path
    assert not [r for r in caplog.records if r.name == "resnext_jax"] and build.BUILD["cached"] is True


def test_eligible_records_why_a_kernel_was_refused(monkeypatch):
    monkeypatch.setattr(cpu, "_WHY_NOT", {})
    monkeypatch.setattr(cpu, "USED", set())
    x32, x16 = jnp.zeros((2, 4), jnp.float32), jnp.zeros((2, 4), jnp.bfloat16)
    assert not cpu.eligible("channel_sums", "gpu", x32)
    assert cpu.report()["not_used"]["channel_sums"] == ("gpu backend" if cpu.available() else cpu.unavailable_reason())
    if cpu.available():
        assert not cpu.eligible("max_pool_grad", "cpu", x16)
        assert "bfloat16" in cpu.report()["not_used"]["max_pool_grad"]
        assert not cpu.eligible("few_channel_conv", "cpu", x32, shape_ok=False)
        assert cpu.report()["not_used"]["few_channel_conv"] == "shapes it does not take"
        assert cpu.eligible("affine_add_relu", "cpu", x32)


def test_report_names_the_kernels_a_traced_step_uses():
    """A grouped conv traced on CPU records the native forward; every kernel is either used or explained."""
    from resnext_jax.ops import conv2d

    x, k = jnp.zeros((1, 8, 8, 32)), jnp.zeros((3, 3, 4, 32))
    jax.jit(lambda x, k: conv2d(x, k, padding=((1, 1), (1, 1)), groups=8, platform="cpu")).lower(x, k)
    report = cpu.report()
    assert set(report["used"]) | set(report["not_used"]) == set(cpu.KERNELS)
    if cpu.available():
        assert "grouped_conv_forward" in report["used"] and report["build"]["library"].endswith(".so")
    else:
        assert report["unavailable_reason"] and not report["used"]


def test_command_line_info_and_build():
    info = subprocess.run(
        [sys.executable, "-m", "resnext_jax.cpu", "info", "--json"], capture_output=True, text=True, check=True
    )
    state = json.loads(info.stdout)
    assert state["available"] == cpu.available() and state["cache"] == cpu.cache_dir()
    assert set(state["not_used"]) == set(cpu.KERNELS)  # a fresh process has traced nothing
    built = subprocess.run([sys.executable, "-m", "resnext_jax.cpu", "build"], capture_output=True, text=True)
    if cpu.available():
        assert built.returncode == 0 and state["build"]["library"] in built.stdout
    else:
        assert built.returncode == 1 and cpu.unavailable_reason() in built.stdout
