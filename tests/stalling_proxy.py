"""A TCP proxy on loopback that can stop forwarding while it keeps its sockets open: a database that hangs (a stalled
VM, a network that drops packets, a saturated host) as a client sees it, without stopping the server the rest of the
run uses. It runs in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy.engine import make_url

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class StallingProxy:
    """Forward every connection made to `port` to the server `open_server` connects to until `stall()`; from then on
    bytes are held (neither side gets a byte, nor an end of stream) until `resume()`. `running()` serves it."""

    def __init__(self, open_server: Opener) -> None:
        self.open_server = open_server
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def stall(self) -> None:
        """Stop forwarding: every connection, open or new, hangs."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, the bytes held first."""
        self._flowing.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StallingProxy]:
        """Listen on a free loopback port (`port`); close every connection when the block ends."""
        server = await asyncio.start_server(self._accept, '127.0.0.1', 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for writer in self._writers:
                writer.close()
            await server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await self.open_server()
        self._writers += [client_writer, server_writer]
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            pump = asyncio.create_task(self._pump(reader, writer))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            await self._flowing.wait()  # an end of stream is held too: a hung peer never closes
            writer.close()


class StallingDatabase(StallingProxy):
    """A `StallingProxy` in front of the PostgreSQL server of `database_url` (TCP or a Unix socket); `url` is the same
    database reached through the proxy."""

    def __init__(self, database_url: str) -> None:
        self._target = make_url(database_url)
        host = self._target.query.get('host') or self._target.host or '/tmp'
        port = self._target.query.get('port') or self._target.port or 5432
        if isinstance(host, tuple):
            host = host[0]

        async def open_server() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if host.startswith('/'):  # a directory: the server's socket in it, as libpq names it
                return await asyncio.open_unix_connection(f'{host}/.s.PGSQL.{port}')
            return await asyncio.open_connection(host, port)

        super().__init__(open_server)

    @property
    def url(self) -> str:
        """The database's URL through the proxy (valid once `running()`)."""
        query = {key: value for key, value in self._target.query.items() if key not in ('host', 'port')}
        proxied = self._target.set(host='127.0.0.1', port=self.port, query=query)
        return proxied.render_as_string(hide_password=False)
