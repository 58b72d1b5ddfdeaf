"""`resnext_jax.ops.host_memory`: when the entry points re-execute with glibc malloc's huge pages, and that they do."""

import os
import subprocess
import sys

import pytest

from resnext_jax.ops import host_memory
from resnext_jax.ops.host_memory import TUNABLE, huge_page_env


@pytest.mark.parametrize(
    "environ,libc,mode,expected",
    [
        ({}, (2, 36), "madvise", TUNABLE),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", f"glibc.malloc.arena_max=2:{TUNABLE}"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user chose: keep it
        ({"GLIBC_TUNABLES": TUNABLE}, (2, 36), "madvise", None),  # already restarted: no loop
        ({"RESNEXT_JAX_HUGEPAGES": "0"}, (2, 36), "madvise", None),
        ({}, (2, 34), "madvise", None),  # glibc without the tunable
        ({}, None, "madvise", None),  # musl, macOS
        ({}, (2, 36), "always", None),  # every mapping gets huge pages anyway
        ({}, (2, 36), "never", None),
        ({}, (2, 36), None, None),
    ],
)
def test_huge_page_env_decision(environ, libc, mode, expected):
    env = huge_page_env(environ, libc, mode)
    assert (env["GLIBC_TUNABLES"] if env is not None else None) == expected
    if env is not None:
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
            k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"
        }


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_restarts_the_same_command_once(tmp_path):
    """The child runs the same script and arguments again, once, with the tunable in its environment."""
    script = tmp_path / "entry.py"
    log = tmp_path / "runs.txt"
    script.write_text(
        "import os, sys\n"
        "from resnext_jax.ops import host_memory\n"
        "host_memory.glibc_version = lambda: (2, 36)\n"
        "host_memory.thp_mode = lambda: 'madvise'\n"
        f"open({str(log)!r}, 'a').write(os.environ.get('GLIBC_TUNABLES', '-') + ' ' + ' '.join(sys.argv[1:]) + '\\n')\n"
        "host_memory.reexec_with_huge_pages(log=lambda m: print(m, file=sys.stderr))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RESNEXT_JAX_HUGEPAGES")}
    result = subprocess.run(
        [sys.executable, str(script), "--flag", "x"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["- --flag x", f"{TUNABLE} --flag x"]
    assert "RESNEXT_JAX_HUGEPAGES=0" in result.stderr
