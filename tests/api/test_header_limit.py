"""`agentrt serve`'s bound on a request's header section (api/header_limit.py): uvicorn with httptools read headers of
any size and number, a 100 MB one holding every other request of the process for 11 s."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from agentrt.api.header_limit import MAX_HEADER_COUNT, HeaderLimitedProtocol
from agentrt.db.settings import get_settings


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with the size of the request's headers and body."""
    if scope['type'] != 'http':
        return
    body = b''
    while True:
        message = await receive()
        body += message.get('body', b'')
        if not message.get('more_body'):
            break
    size = sum(len(name) + len(value) for name, value in scope['headers'])
    answer = json.dumps({'headers': size, 'body': len(body)}).encode()
    await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-length', b'%d' % len(answer))]})
    await send({'type': 'http.response.body', 'body': answer})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    """The protocol under uvicorn, in this process, on a Unix socket (no TCP port to share): the socket's path."""
    path = str(tmp_path / 'http.sock')
    config = uvicorn.Config(_echo, uds=path, http=HeaderLimitedProtocol, log_config=None, lifespan='off')
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve())
    while not served.started:  # noqa: ASYNC110 - uvicorn says it has started by this flag alone
        await asyncio.sleep(0.01)
    yield path
    served.should_exit = True
    await task


def _request(headers: list[tuple[str, str]], target: str = '/', body: bytes = b'') -> bytes:
    lines = [f'POST {target} HTTP/1.1', 'Host: test', f'Content-Length: {len(body)}']
    lines += [f'{name}: {value}' for name, value in headers]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode() + body


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), 5)
    status_line, *lines = head.decode().split('\r\n')
    headers = dict(line.lower().split(': ', 1) for line in lines if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers['content-length'])), 5)
    return int(status_line.split()[1]), headers, body


def _send_and_read(path: str, head: bytes, rest: int) -> bytes:
    """Send `head`, then up to `rest` bytes of a header value in pieces as a client streaming it would, stopping when
    the server will take no more; then read what it answered until it closed the connection."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(path)
        client.sendall(head)
        try:
            for _ in range(rest // PIECE):
                client.sendall(b'a' * PIECE)
        except OSError:  # the server closed the connection (or stopped reading): it reads no more of it
            pass
        answer = b''
        try:
            while piece := client.recv(65536):
                answer += piece
        except ConnectionResetError:  # closed with what the client sent unread: the answer came before
            pass
        return answer


PIECE = 16 * 1024


async def test_a_one_megabyte_header_is_refused_early_and_the_connection_closed(server: str) -> None:
    started = time.monotonic()
    answer = await asyncio.to_thread(_send_and_read, server, _request([])[: -len(b'\r\n')] + b'X-Big: ', 1024 * 1024)
    head, _, body = answer.partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 431 ') and b'connection: close' in head
    refusal = json.loads(body)  # the whole answer, then the connection's end
    assert refusal['type'] == 'headers_too_large' and refusal['error_id'].startswith('err_')
    assert f'{get_settings().http_max_header_bytes:,} bytes' in refusal['detail']
    assert time.monotonic() - started < 5


async def test_too_many_headers_are_refused(server: str) -> None:
    reader, writer = await asyncio.open_unix_connection(server)
    writer.write(_request([(f'X-H{n}', 'v') for n in range(2 * MAX_HEADER_COUNT)]))
    status, _, body = await _response(reader)
    assert status == 431 and f'more than {MAX_HEADER_COUNT} headers' in json.loads(body)['detail']
    assert await asyncio.wait_for(reader.read(), 5) == b''
    writer.close()


async def test_a_url_over_the_limit_is_refused(server: str) -> None:
    reader, writer = await asyncio.open_unix_connection(server)
    writer.write(_request([], target='/?q=' + 'a' * 2 * get_settings().http_max_header_bytes))
    status, _, _ = await _response(reader)
    assert status == 431
    writer.close()


async def test_ordinary_headers_and_a_large_body_are_served(server: str) -> None:
    reader, writer = await asyncio.open_unix_connection(server)
    body = b'x' * 3 * get_settings().http_max_header_bytes  # the body is not the headers'
    writer.write(_request([('Cookie', 'c' * 4096), *((f'X-H{n}', 'v') for n in range(50))], body=body))
    status, _, answer = await _response(reader)
    assert status == 200 and json.loads(answer)['body'] == len(body)
    writer.close()


async def test_each_request_of_a_connection_is_counted_anew(server: str) -> None:
    # Two requests of 40 KB headers each, 80 KB on one connection: one after the other, then pipelined in one write.
    reader, writer = await asyncio.open_unix_connection(server)
    request = _request([('Cookie', 'c' * 40 * 1024)], body=b'{}')
    for _ in range(2):
        writer.write(request)
        status, _, answer = await _response(reader)
        assert status == 200 and json.loads(answer)['headers'] > 40 * 1024
    writer.write(request * 3)
    for _ in range(3):
        status, _, _ = await _response(reader)
        assert status == 200
    writer.close()
