"""The peer watch: a dead process ends the whole multi-host job within `config.peer_timeout_s`, in one line.

Without it a survivor of a kill -9 waits in a collective or barrier until the distributed runtime's heartbeat
timeout, and then the runtime aborts it from C++ with a fatal-error log and a Python thread dump. Here each process
bumps a counter in the runtime's key-value store every second and reads everyone's counters back; a peer whose
counter stops moving for half of `peer_timeout_s` (or a coordinator that stops answering) is lost. The process
then prints one line that names the lost process and says that the same command resumes, and exits with
`PEER_LOST_EXIT_CODE`, before the runtime's own heartbeat (twice `peer_timeout_s`) would abort it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time

PEER_LOST_EXIT_CODE = 3
_console = 2  # where the one line goes: stderr, or the console behind `QuietRuntimeErrors`
_PREFIX = "resnext_jax/peers/"


class PeerWatch:
    """Watches the other processes of the job from two daemon threads (one talks to the key-value store, one
    judges, so that a store call that hangs still ends in a verdict)."""

    def __init__(self, client, process_index: int, process_count: int, timeout_s: float):
        self.client, self.process_index, self.process_count = client, process_index, process_count
        self.stale_s = max(2.0, timeout_s / 2)
        self.interval_s = min(1.0, self.stale_s / 4)
        now = time.monotonic()
        self._last_answer = now  # the last time the key-value store answered
        self._seen = {index: (None, now) for index in range(process_count) if index != process_index}
        self._done: set[int] = set()
        self._announced: int | None = None
        self._leaving: set[int] = set()  # processes that found a peer lost and are exiting
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, name="peer-watch-poll", daemon=True),
            threading.Thread(target=self._judge, name="peer-watch-judge", daemon=True),
        ]

    def start(self) -> PeerWatch:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, finished: bool) -> None:
        """Stops watching; `finished` tells the peers that this process ended normally (not lost)."""
        if finished:
            try:
                self.client.key_value_set(f"{_PREFIX}done/{self.process_index}", "1", allow_overwrite=True)
            except Exception:  # noqa: BLE001 (the coordinator may have finished first; nothing to tell then)
                pass
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def wait_for_verdict(self) -> None:
        """Gives the judge time to find a lost peer (after an error that a lost peer may have caused): exits the
        process if it does, else returns."""
        deadline = time.monotonic() + self.stale_s + 3 * self.interval_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(self.interval_s)

    def _poll(self) -> None:
        beat = 0
        while not self._stopping.is_set():
            beat += 1
            try:
                self.client.key_value_set(f"{_PREFIX}alive/{self.process_index}", str(beat), allow_overwrite=True)
                entries = self.client.key_value_dir_get(_PREFIX)
            except Exception:  # noqa: BLE001 (an unreachable coordinator: the judge decides when it is lost)
                self._stopping.wait(self.interval_s)
                continue
            now = time.monotonic()
            self._last_answer = now
            for key, value in entries:
                kind, _, index = key[len(_PREFIX) :].partition("/")
                if kind == "alive" and index.isdigit() and int(index) in self._seen:
                    if self._seen[int(index)][0] != value:
                        self._seen[int(index)] = (value, now)
                elif kind == "done" and index.isdigit():
                    self._done.add(int(index))
                elif kind == "lost" and value.isdigit():
                    self._announced = int(value)
                elif kind == "leaving" and index.isdigit():
                    self._leaving.add(int(index))
            self._stopping.wait(self.interval_s)

    def _leave(self) -> None:
        try:
            self.client.key_value_set(f"{_PREFIX}leaving/{self.process_index}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 (the coordinator may be the one that is gone)
            pass

    def _judge(self) -> None:
        while not self._stopping.wait(self.interval_s / 2):
            now = time.monotonic()
            if self._announced is not None and self._announced != self.process_index:
                self._lost(self._announced, "another process found it gone")
            if now - self._last_answer > self.stale_s and self.process_index != 0:
                self._lost(0, f"the coordinator stopped answering for {now - self._last_answer:.0f} s")
            for index, (_, changed) in self._seen.items():
                if index not in self._done and now - changed > self.stale_s:
                    self._announce(index)
                    self._lost(index, f"no heartbeat for {now - changed:.0f} s")

    def _announce(self, index: int) -> None:
        """Tells the others which process was lost (so that they name it, not the coordinator that exits next);
        process 0, whose exit ends the coordinator, first waits (a few seconds at most) until they have read it."""

        def tell():
            try:
                self.client.key_value_set(f"{_PREFIX}lost", str(index), allow_overwrite=True)
            except Exception:  # noqa: BLE001 (the coordinator itself may be gone)
                pass

        thread = threading.Thread(target=tell, daemon=True)
        thread.start()
        thread.join(timeout=2)
        if self.process_index != 0:
            return
        others = {i for i in self._seen if i != index}
        deadline = time.monotonic() + 2 * self.interval_s + 1
        while others - self._leaving and time.monotonic() < deadline:
            time.sleep(self.interval_s / 4)

    def _lost(self, index: int, why: str) -> None:
        if self._stopping.is_set():
            return
        if self.process_index != 0:  # lets process 0 (the coordinator) know it may exit now
            thread = threading.Thread(target=self._leave, daemon=True)
            thread.start()
            thread.join(timeout=1)
        sys.stderr.flush()
        os.write(
            _console,
            f"error: process {index} of {self.process_count} was lost ({why}); process {self.process_index} stops "
            f"too. Rerun the same command on every host to resume from the last checkpoint.\n".encode(),
        )
        os._exit(PEER_LOST_EXIT_CODE)  # no atexit: jax's shutdown barrier would wait for the lost process


# The distributed runtime's C++ log lines ("E1207 20:53:56.571090   22017 coordination_service_agent.cc:289] ..."),
# and the lines its messages continue on.
_NATIVE_LOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+\.(cc|h):\d+\]")
_CONTINUATION = (b"Additional GRPC error", b":UNKNOWN:", b"RPC: /", b"*** Check failure", b"    @ ", b"The tasks ")
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"


class QuietRuntimeErrors:
    """Keeps the distributed runtime's own fault reports off the console when a peer is lost.

    When the coordinator (process 0) dies, the runtime's error poller in every other process logs a fatal error
    from C++ and aborts, and Python's faulthandler adds a thread dump, before the peer watch can judge. This routes
    file descriptor 2 through a filter thread that drops the runtime's C++ log lines and, on its fatal one, prints
    the peer watch's one line and exits; SIGABRT waits a few seconds first (libc `sleep`), so that the filter runs.
    Everything else on stderr passes through unchanged. `--verbose` runs without it.
    """

    def __init__(self, process_index: int, process_count: int):
        global _console
        import atexit
        import ctypes
        import faulthandler
        import signal

        self.process_index, self.process_count = process_index, process_count
        faulthandler.disable()
        libc = ctypes.CDLL(None)
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        libc.signal(signal.SIGABRT, ctypes.cast(libc.sleep, ctypes.c_void_p))  # sleep(SIGABRT=6 s), then abort
        sys.stderr.flush()
        self.console = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read_end = read_end
        self._thread = threading.Thread(target=self._pump, name="quiet-runtime-errors", daemon=True)
        self._thread.start()
        _console = self.console
        atexit.register(self.close)

    def close(self) -> None:
        """Puts the console back on fd 2 and forwards what is still in the pipe."""
        global _console
        sys.stderr.flush()
        _console = 2
        os.dup2(self.console, 2)  # closes the pipe's last write end: the filter reads to the end and stops
        self._thread.join(timeout=5)

    def _pump(self) -> None:
        pending, dropping = b"", False
        while True:
            chunk = os.read(self._read_end, 65536)
            if not chunk:
                if pending:
                    os.write(self.console, pending)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = []
            for number, line in enumerate(lines):
                if _FATAL in line:  # the report continues on the next lines (e.g. the unhealthy task's number)
                    self._fatal(b"\n".join(lines[number:]) + b"\n" + pending)
                if _NATIVE_LOG.match(line):
                    dropping = True
                elif not (dropping and (line.startswith(_CONTINUATION) or line.strip().isdigit())):
                    dropping = False
                    out.append(line + b"\n")
            if pending and pending[:1] not in b"IWEF":  # a progress bar's partial line: show it now
                out.append(pending)
                pending = b""
            if out:
                os.write(self.console, b"".join(out))

    def _fatal(self, report: bytes) -> None:
        lost = lost_process(report, self.process_index)
        os.write(
            self.console,
            f"error: process {lost} of {self.process_count} was lost (the distributed runtime reports it); process "
            f"{self.process_index} stops too. Rerun the same command on every host to resume from the last "
            f"checkpoint.\n".encode(),
        )
        os._exit(PEER_LOST_EXIT_CODE)


def lost_process(report: bytes, process_index: int) -> int | str:
    """The process that the distributed runtime's fatal report names ("Task 2 heartbeat timeout", "tasks are
    unhealthy (stopped sending heartbeats):\n2", ".../task:2"); a report that names none means that the leader,
    process 0, stopped answering (or, seen from process 0 itself, "another" process)."""
    found = re.search(rb"[Tt]ask (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)|/task:(\d+)", report)
    if found:
        return next(int(group) for group in found.groups() if group is not None)
    return 0 if process_index != 0 else "another"
