"""A bound on a request's header section under `agentrt serve`: uvicorn's httptools protocol with a limit on its size
(`AGENTRT_HTTP_MAX_HEADER_BYTES`) and on the number of its headers (`MAX_HEADER_COUNT`), answered 431.

httptools puts no limit on either, and builds a header value that arrives in pieces by copying it whole for each piece
(`bytes +=`), on the event loop: one 100 MB header to `/health/live`, sent before any key is checked, took 11 s and
held every other request of the process meanwhile; 5,000,000 empty headers were accepted. h11 has a bound, at a CPU
cost per request (BENCHMARKS.md): this keeps httptools and stops reading a header section once it is over the limit.
"""

from __future__ import annotations

import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from agentrt.api.errors import ApiError, public_error
from agentrt.db.settings import get_settings

MAX_HEADER_COUNT = 100
"""The most header fields a request may have (Apache's `LimitRequestFields`, gunicorn's `limit_request_fields`)."""

_LINE_OVERHEAD = 4
"""A header line's bytes besides its name and value (`: ` and CRLF), counted with them."""


class _HeadersTooLarge(Exception):
    """Raised in a parser callback to stop the parser: the header section is over a bound."""


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol refusing (431, connection closed) a request whose request line and headers take
    more than `AGENTRT_HTTP_MAX_HEADER_BYTES` bytes, or that has more than `MAX_HEADER_COUNT` headers.

    Two counts, each against the limit: the bytes received while a header section is unfinished (a header still
    arriving in pieces, which httptools holds and copies: it is what must stop early), and the URL and each header as
    the parser delivers them (a whole section that came in one read is never "unfinished" between reads). Both start
    again with each request of a keep-alive connection. Passed to uvicorn by name (`http=`), so the workers of
    `--workers N` use it too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = get_settings().http_max_header_bytes
        self._reading_headers = True  # a connection starts with a request's headers
        self._received = 0  # bytes received while this request's header section was unfinished
        self._parsed = 0  # bytes of the request line and the headers the parser has delivered
        self._count = 0
        self._began = False  # whether a request began in the read being parsed
        self._refused = False

    def data_received(self, data: bytes) -> None:
        """Feed `data` to the parser as uvicorn does, refusing the request once its header section is over a bound."""
        if self._refused:  # the rest of a refused request, read before the transport stopped reading
            return
        reading = self._reading_headers
        self._began = False
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge):
                self._refuse(str(exc.__context__))
                return
            self._invalid()
            return
        except httptools.HttpParserError:
            self._invalid()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # Counted after the parser had it: a read that finished the headers may hold a body, which is not theirs; one
        # in which a request began may end another one (pipelined requests), so it is left to the parser's count (what
        # of it is unfinished is less than a read).
        if reading and self._reading_headers and not self._began:
            self._received += len(data)
            if self._received > self.max_header_bytes:
                self._refuse(f'the request headers are over {self.max_header_bytes:,} bytes')

    def _invalid(self) -> None:
        """uvicorn's answer to a request its parser refuses."""
        message = 'Invalid HTTP request received.'
        self.logger.warning(message)
        self.send_400_response(message)

    def on_message_begin(self) -> None:
        """A request begins: its header section is counted from nothing."""
        super().on_message_begin()
        self._parsed = self._count = 0
        self._began = True

    def on_url(self, url: bytes) -> None:
        """A piece of the URL: counted, refused past the limit before uvicorn joins it to the rest."""
        self._parsed += len(url)
        self._check()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """A whole header: counted, refused past either bound."""
        self._count += 1
        self._parsed += len(name) + len(value) + _LINE_OVERHEAD
        if self._count > MAX_HEADER_COUNT:
            raise _HeadersTooLarge(f'the request has more than {MAX_HEADER_COUNT} headers')
        self._check()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The header section ended within its bounds: what follows is the body, not counted."""
        self._reading_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request ended: the next one on the connection starts with its headers, counted anew."""
        self._reading_headers = True
        self._received = 0
        super().on_message_complete()

    def _check(self) -> None:
        if self._parsed > self.max_header_bytes:
            raise _HeadersTooLarge(f'the request headers are over {self.max_header_bytes:,} bytes')

    def _refuse(self, message: str) -> None:
        """Answer 431 in the API's error body (its id logged at INFO) and close the connection, reading no more."""
        self._refused = True
        where = f'{self.client[0]}:{self.client[1]}' if self.client else ''
        error = public_error(ApiError(431, 'headers_too_large', message), where=f'request headers from {where}'.strip())
        body = json.dumps(error.body()).encode()
        head = [STATUS_LINE[431]]
        head.extend(name + b': ' + value + b'\r\n' for name, value in self.server_state.default_headers)
        head.append(b'content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n' % len(body))
        self.transport.write(b''.join(head) + body)
        self.transport.close()
