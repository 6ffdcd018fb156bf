"""The Prometheus endpoint: `GET /metrics` over HTTP/1.1, every connection a coroutine of one thread's loop.

prometheus_client's own server starts a thread per connection and waits on each without a timeout, so
silent connections pile up threads. Here one thread serves every connection; a connection must bring its
whole request head within `idle_timeout_s` and is closed after one answer (scrapers reconnect), and past
`max_connections` open ones a new connection is closed at once.
"""

from __future__ import annotations

import asyncio
import threading

import prometheus_client
from prometheus_client.exposition import choose_encoder

MAX_HEAD_BYTES = 16 * 1024  # a scrape's request line and headers take a few hundred


class MetricsEndpoint:
    """Serves `registry` on `host:port` (0: a free port) from its construction to `close()`."""

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry,
        host: str,
        port: int,
        idle_timeout_s: float = 30.0,
        max_connections: int = 1000,
    ) -> None:
        self._registry = registry
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self._writers: set[asyncio.StreamWriter] = set()  # the open connections, touched only on the loop
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics-endpoint", daemon=True)
        self._thread.start()
        listen = asyncio.start_server(
            self._serve,
            None if host in ("::", "0.0.0.0") else host,  # None: every interface, IPv4 and IPv6
            port,
            limit=MAX_HEAD_BYTES,
            backlog=128,
        )
        try:  # on the endpoint's own loop: the caller may be running a loop of its own
            self._server = asyncio.run_coroutine_threadsafe(listen, self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def num_connections(self) -> int:
        """The connections open now."""
        return len(self._writers)

    def close(self) -> None:
        """Stop listening, close every connection and end the thread."""

        async def stop() -> None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            writer.close()
            return
        self._writers.add(writer)
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), self.idle_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # silent, slow, oversized or gone: nothing to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        """The whole HTTP response to the request whose head is `head`."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method != "GET":
            return _response("405 Method Not Allowed", b"only GET\n")
        if path != "/metrics":
            return _response("404 Not Found", b"the metrics are at /metrics\n")
        headers = dict(line.partition(":")[::2] for line in header_lines if line)
        accept = next((value.strip() for name, value in headers.items() if name.lower() == "accept"), None)
        encoder, content_type = choose_encoder(accept)
        return _response("200 OK", encoder(self._registry), content_type)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
