"""A loopback TCP proxy that adds a fixed latency to every byte it forwards (for the latency fault).

Guarantees: bytes are forwarded in order, each chunk released ``upstream_ms`` (client -> server) or
``downstream_ms`` (server -> client) after it was read, so the delay is added to every round trip
without serializing the stream (chunks in flight overlap, as on a long link). It listens on
127.0.0.1 only and refuses any other listen address. Closing one side closes the other after the
delayed bytes are delivered.

Not guaranteed: bandwidth shaping, jitter or packet loss; only added latency.

::

    python tests/performance/tcp_proxy.py --listen 19192 --target 19190 --upstream-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass(slots=True, frozen=True)
class ProxySettings:
    """``ProxySettings(listen_port=19192, target_port=19190, upstream_ms=200)``."""

    listen_port: int
    """Port the proxy listens on (127.0.0.1)."""
    target_port: int
    """Port of the real server on 127.0.0.1."""
    upstream_ms: float = 0.0
    """Latency added to client -> server bytes."""
    downstream_ms: float = 0.0
    """Latency added to server -> client bytes."""

    def __post_init__(self) -> None:
        for name in ("listen_port", "target_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise ValueError(f"{name} must be a TCP port 0-65535, got {v!r}")
        for name in ("upstream_ms", "downstream_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 ms, got {getattr(self, name)!r}")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    # Reader and sender are separate tasks joined by a queue: a chunk waits its own delay only,
    # so throughput is not capped at one chunk per delay.
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + delay_s, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((time.monotonic() + delay_s, b""))

    async def send() -> None:
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    await asyncio.gather(read(), send())


class LatencyProxy:
    """Run in a background thread: ``with LatencyProxy(ProxySettings(19192, 19190, 200)): ...``."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        s = self.settings
        try:
            s_reader, s_writer = await asyncio.open_connection(LOOPBACK, s.target_port)
        except OSError:
            # Server down (the broker is restarting): the client sees a closed connection and retries.
            c_writer.close()
            return
        await asyncio.gather(_pump(c_reader, s_writer, s.upstream_ms / 1000),
                             _pump(s_reader, c_writer, s.downstream_ms / 1000))

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, LOOPBACK, self.settings.listen_port, reuse_address=True))
        except BaseException as exc:  # noqa: BLE001 - handed to start() to raise in the caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def start(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise OSError(f"proxy cannot listen on {LOOPBACK}:{self.settings.listen_port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--upstream-ms", type=float, default=0.0)
    parser.add_argument("--downstream-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    proxy = LatencyProxy(ProxySettings(args.listen, args.target, args.upstream_ms, args.downstream_ms)).start()
    print(f"proxy 127.0.0.1:{args.listen} -> 127.0.0.1:{args.target} "
          f"(+{args.upstream_ms} ms up, +{args.downstream_ms} ms down); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
