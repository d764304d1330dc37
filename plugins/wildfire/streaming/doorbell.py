"""A cross-process doorbell for the spool: writers ring after committing a CRITICAL record, the drainer wakes.

The stream worker waits for work on events, not timers. Its own admission wakes it directly; a write by another
process (a batch task, the load-test harness, any ``Ingestor`` elsewhere) is only in the spool file, and
without a signal the worker would have to poll for it. The doorbell is that signal for the records that cannot
wait: the draining worker binds an ``AF_UNIX`` datagram socket next to the spool file (``<spool>.bell``, the
spool's real path plus ``.bell``), and :class:`BellRinger` (used by :class:`wildfire.ingest.Ingestor` after a
committed write that accepted a CRITICAL record) sends it one byte with a non-blocking ``sendto``.

The bell is a latency hint, never part of durability: a ring is sent only after the write committed, and every
failure on the ringing side (no socket file, a stale file of a killed worker that refuses the connection, a
bell whose queue already holds unread rings, a directory the writer may not use, a path too long for
``sun_path``) is ignored silently and costs nothing else. The worker's ``PRAGMA data_version`` check stays as
the fallback that makes delivery independent of the bell (see ``StreamWorker._idle_wait``).

Who binds: only the process that holds the spool's drain lock (``BufferManager.acquire_drain_lock``: one
draining process per spool), so replacing a socket file found at bind time cannot steal a live worker's bell:
it is a stale file left by a worker that was killed (SIGKILL leaves the file; the kernel frees the socket).
A path longer than ``sun_path`` allows (:data:`SUN_PATH_MAX` bytes), a file of another kind at the bell's
path, or a directory the worker may not write gives no doorbell: one log line, and the worker keeps polling.

:class:`Doorbell` also carries a self-pipe (:meth:`Doorbell.poke`) so this process's own writes, from any
thread, wake the same ``poll``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import stat
import time
import weakref

log = logging.getLogger(__name__)

SUFFIX = ".bell"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) on Linux (108) minus the terminating NUL
_DRAIN_CHUNK = 256  # self-pipe bytes read per os.read; every pending byte means the same thing


def bell_path(spool_path: str | os.PathLike[str]) -> str:
    """Where the doorbell of the spool at ``spool_path`` lives: its real path plus ``.bell``.

    The real path (symlinks resolved) so a writer that names the spool through a symlink or a relative path
    rings the same socket the worker bound.
    """
    return os.path.realpath(os.fspath(spool_path)) + SUFFIX


def _fits(path: str) -> bool:
    return len(os.fsencode(path)) <= SUN_PATH_MAX


class BellRinger:
    """The writer side: ``ring()`` sends one byte to the spool's doorbell; it never raises, never blocks."""

    def __init__(self, spool_path: str | os.PathLike[str]) -> None:
        path = bell_path(spool_path)
        self.path: str | None = path if _fits(path) else None  # too long: no worker can have bound it
        self._sock: socket.socket | None = None
        self.rung = 0  # rings the kernel took (for tests and metrics)
        self.failed = 0  # rings that found no listener, a full bell or any other error (ignored)

    def ring(self) -> bool:
        """Ring once; True when the byte was queued to a listening worker. Every error is swallowed."""
        if self.path is None:
            return False
        try:
            sock = self._sock
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            sock.sendto(b"!", self.path)
        except OSError:
            # ENOENT (no worker), ECONNREFUSED (a stale file of a killed worker), EAGAIN/ENOBUFS (the bell
            # already has unread rings: the worker is woken anyway), EACCES, EMFILE...: the write is committed
            # regardless, and the worker's data-version check finds it.
            self.failed += 1
            return False
        self.rung += 1
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class Doorbell:
    """The drainer side: a bound bell socket (when possible) and a self-pipe, waited on together (``poll``).

    ``Doorbell(spool_path)`` binds at once; ``bound`` says whether other processes can ring it. ``wait(t)``
    blocks up to ``t`` seconds and returns the ``(rings, pokes)`` it took; ``take()`` empties both at once. ``close()`` removes the socket file if it is still the one this bell bound.
    """

    def __init__(self, spool_path: str | os.PathLike[str]) -> None:
        self.path = bell_path(spool_path)
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self.rings = 0  # rings taken from other processes' writers (or any ringer)
        self.pokes = 0  # wake-ups by this process (poke)
        self.problem: str | None = None  # why there is no doorbell, when there is none
        self._rd, self._wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A worker built and never run (or never closed) must not leak the pipe: closed when collected.
        self._close_pipe = weakref.finalize(self, _close_fds, self._rd, self._wr)
        self._buf = bytearray(1)
        self._bind()
        # poll(2), not select(2): a worker in a process with many open files (Airflow) may get descriptors above
        # select's FD_SETSIZE (1024); and the registration is made once, not per wait.
        self._poller = select.poll()
        self._poller.register(self._rd, select.POLLIN)
        self._sock_fd = -1
        if self._sock is not None:
            self._sock_fd = self._sock.fileno()
            self._poller.register(self._sock_fd, select.POLLIN)

    @property
    def bound(self) -> bool:
        return self._sock is not None

    def _bind(self) -> None:
        if not _fits(self.path):
            self.problem = f"path too long for a unix socket ({len(os.fsencode(self.path))} > {SUN_PATH_MAX} bytes)"
            log.warning("spool doorbell %s: %s; other processes' writes are found by polling", self.path,
                        self.problem)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise FileExistsError(f"{self.path} exists and is not a socket; left in place")
                # A socket file here is stale: only the drain-lock holder binds, and that is this process.
                os.unlink(self.path)
            sock.bind(self.path)
            st = os.stat(self.path)
        except OSError as exc:
            sock.close()
            self.problem = f"{type(exc).__name__}: {exc}"
            log.warning("spool doorbell %s unavailable (%s); other processes' writes are found by polling",
                        self.path, self.problem)
            return
        self._sock = sock
        self._ino = (st.st_dev, st.st_ino)

    def poke(self) -> None:
        """Wake a ``wait`` from this process (any thread). A full pipe already has a wake-up pending."""
        with contextlib.suppress(OSError):
            os.write(self._wr, b"!")

    def wait(self, timeout_s: float) -> tuple[int, int]:
        """Block until a ring or a poke is pending or ``timeout_s`` passes; take what is pending and return
        ``(rings, pokes)`` taken ((0, 0): timed out). Pending wake-ups are level-triggered: a ring or poke that
        arrived before the call returns at once. Nothing is read from a descriptor that is not ready (an idle
        wait costs one ``poll`` per call)."""
        if self._rd < 0:  # closed (shutdown): behave like a timeout, without spinning
            time.sleep(max(0.0, timeout_s))
            return 0, 0
        ready = self._poller.poll(max(0, math.ceil(timeout_s * 1000)))
        if not ready:
            return 0, 0
        fds = {fd for fd, _ in ready}
        return self._take(self._sock_fd in fds, self._rd in fds)

    def take(self) -> tuple[int, int]:
        """Empty the bell and the self-pipe without waiting; return how many (rings, pokes) were pending."""
        return self._take(self._sock is not None, True)

    def _take(self, bell: bool, pipe: bool) -> tuple[int, int]:
        rings = pokes = 0
        if bell and self._sock is not None:
            while True:
                try:
                    self._sock.recv_into(self._buf, 1)  # one datagram per call, whatever its length
                except OSError:  # EAGAIN: empty
                    break
                rings += 1
        while pipe:
            try:
                chunk = os.read(self._rd, _DRAIN_CHUNK)
            except OSError:  # EAGAIN: empty
                break
            pokes += len(chunk)
            if len(chunk) < _DRAIN_CHUNK:  # drained (a short read: no need for the EAGAIN of another)
                break
        self.rings += rings
        self.pokes += pokes
        return rings, pokes

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # Remove the file only if it is still ours (a later worker may have replaced it already).
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            sock.close()
        self._close_pipe()
        self._rd = self._wr = self._sock_fd = -1


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

