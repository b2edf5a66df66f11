"""A lean HTTP/1.1 client for the Bot API (issue 8).

Under load the bot's event loop spent about half its time inside httpx/httpcore/anyio for the Telegram
calls (sendMessage, answerCallbackQuery, getUpdates): layers of abstraction, a pool that inspects every
idle connection (``getpeername``, a readability poll) before each request, a timeout scope per operation.
``LeanRequest`` does what the Bot API needs: a form-encoded POST over a kept-alive connection
(TLS for api.telegram.org), one ``Content-Length`` or chunked body back. Uploads (multipart) and proxies
go through python-telegram-bot's ``HTTPXRequest`` as before.

Errors map as python-telegram-bot expects: a time-out is ``TimedOut``, a broken connection
``NetworkError`` (the sender then retries through the outbox).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlencode, urlsplit

from telegram._utils.defaultvalue import DEFAULT_NONE
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, HTTPXRequest, RequestData

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LeanRequest(BaseRequest):
    def __init__(
        self,
        connection_pool_size: int = 16,
        read_timeout: float | None = 10.0,
        write_timeout: float | None = 10.0,
        connect_timeout: float | None = 5.0,
        pool_timeout: float | None = 5.0,
    ) -> None:
        self.pool_size = connection_pool_size
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._idle: dict[tuple[str, str, int], deque[_Conn]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._ssl: ssl.SSLContext | None = None
        self._uploads = HTTPXRequest(
            connection_pool_size=2,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            connect_timeout=connect_timeout,
            pool_timeout=pool_timeout,
        )

    @property
    def read_timeout(self) -> float | None:
        return self._read_timeout

    async def initialize(self) -> None:
        await self._uploads.initialize()

    async def shutdown(self) -> None:
        for conns in self._idle.values():
            while conns:
                _, writer = conns.popleft()
                writer.close()
        await self._uploads.shutdown()

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = DEFAULT_NONE,
        write_timeout: Any = DEFAULT_NONE,
        connect_timeout: Any = DEFAULT_NONE,
        pool_timeout: Any = DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        if request_data is not None and request_data.multipart_data:
            return await self._uploads.do_request(
                url, method, request_data, read_timeout, write_timeout, connect_timeout, pool_timeout
            )
        read_t = self._read_timeout if read_timeout is DEFAULT_NONE else read_timeout
        write_t = self._write_timeout if write_timeout is DEFAULT_NONE else write_timeout
        connect_t = self._connect_timeout if connect_timeout is DEFAULT_NONE else connect_timeout
        pool_t = self._pool_timeout if pool_timeout is DEFAULT_NONE else pool_timeout
        parts = urlsplit(url)
        scheme = parts.scheme or "https"
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = urlencode(request_data.json_parameters).encode() if request_data is not None else b""
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode("latin-1")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.pool_size)
        try:
            await asyncio.wait_for(self._slots.acquire(), pool_t)
        except TimeoutError as err:
            raise TimedOut("Pool timeout: all connections to the Bot API are in use") from err
        key = (scheme, host, port)
        conn: _Conn | None = None
        try:
            conn = await self._connection(key, connect_t)
            reader, writer = conn
            writer.write(head + body)
            if writer.transport.get_write_buffer_size():
                await asyncio.wait_for(writer.drain(), write_t)
            status, payload, keep = await asyncio.wait_for(_read_response(reader), read_t)
            if keep:
                self._idle.setdefault(key, deque()).append(conn)
                conn = None
            return status, payload
        except TimeoutError as err:
            raise TimedOut("Timed out talking to the Bot API") from err
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise NetworkError(f"Bot API connection failed: {err!r}") from err
        finally:
            if conn is not None:
                conn[1].close()
            self._slots.release()

    async def _connection(self, key: tuple[str, str, int], timeout: float | None) -> _Conn:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()  # the most recently used: the least likely to have been closed
            if not reader.at_eof() and not writer.is_closing() and not reader._buffer:
                return reader, writer
            writer.close()
        scheme, host, port = key
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        return await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self._ssl if scheme == "https" else None), timeout
        )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from the Bot API
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        payload = b"".join(chunks)
    elif "content-length" in headers:
        payload = await reader.readexactly(int(headers["content-length"]))
    else:  # the body ends with the connection
        return int(status), await reader.read(), False
    connection = headers.get("connection", "").lower()
    keep = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
    return int(status), payload, keep
