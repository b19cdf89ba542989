"""Reading a request body with limits on size, time and multipart structure.

Why this module exists: the first version read the whole body, then handed multipart bodies
to the standard library's MIME parser, which recurses on nested comments in part headers (a
~400-byte body raised ``RecursionError`` → 500) and spends seconds of GIL-holding CPU on
crafted 10 MiB bodies. Here the body is streamed once, chunk by chunk, into
``python-multipart``'s state machine (the parser FastAPI/Starlette use), with a cap on the
number of parts, on each part's headers and on the bytes kept, and a deadline for the whole
read; every malformed body is a 400 that says what is wrong, in time bounded by the limits.

A body that is too large is *drained* (read and discarded) up to ``drain_bytes`` before the
413 is sent: clients that write the whole body before reading the answer (Python
``requests``/``urllib``) would otherwise see a connection reset instead of the JSON 413.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from serve_app.imaging import ImageRejected

MAX_CONTENT_TYPE_BYTES = 1024  # a Content-Type with a boundary and a charset is ~100 bytes
MAX_BOUNDARY_BYTES = 70  # RFC 2046 §5.1.1


@dataclass(frozen=True)
class BodyLimits:
    """How much a client may send, and for how long."""

    max_bytes: int = 10 * 2**20
    read_timeout_s: float = 30.0  # the whole body; a slower client gets 408
    drain_bytes: int = 128 * 2**20  # read (and drop) this much of a too-large body before answering 413
    drain_timeout_s: float = 10.0
    max_parts: int = 16
    max_part_headers: int = 16
    max_part_header_bytes: int = 4096


class _MultipartField:
    """Streams a ``multipart/form-data`` body and keeps only the bytes of one field."""

    def __init__(self, content_type: str, field: str, limits: BodyLimits) -> None:
        if len(content_type) > MAX_CONTENT_TYPE_BYTES:
            raise _bad(f"the Content-Type header is {len(content_type)} bytes, more than {MAX_CONTENT_TYPE_BYTES}")
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise _bad("multipart/form-data request without a boundary parameter in its Content-Type")
        if len(boundary) > MAX_BOUNDARY_BYTES:
            raise _bad(f"the multipart boundary is {len(boundary)} bytes, more than {MAX_BOUNDARY_BYTES}")
        self._field, self._limits = field.encode(), limits
        self._parts = 0
        self._header_name = b""
        self._disposition = b""
        self._current: Optional[list[bytes]] = None  # chunks of the field being kept
        self._names: list[str] = []
        self._value: Optional[bytes] = None
        self._done = False
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        # the parser logs each malformed body at WARNING: that is the client's error, answered with a 400
        logging.getLogger("python_multipart").setLevel(logging.ERROR)
        self._parser = MultipartParser(
            boundary,
            callbacks,  # type: ignore[arg-type]
            max_header_count=limits.max_part_headers,
            max_header_size=limits.max_part_header_bytes,
        )

    # -- parser callbacks ---------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._limits.max_parts:
            raise _bad(f"the multipart body has more than {self._limits.max_parts} parts")
        self._header_name, self._disposition, self._current = b"", b"", None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition += data[start:end]

    def _header_end(self) -> None:
        self._header_name = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name", b"")
        self._names.append(name.decode("latin-1"))
        if name == self._field and self._value is None:
            self._current = []

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.append(data[start:end])

    def _part_end(self) -> None:
        if self._current is not None:
            self._value, self._current = b"".join(self._current), None

    def _end(self) -> None:
        self._done = True

    # -- feeding ------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as err:
            raise _bad(f"the multipart body cannot be parsed: {err}") from None

    def value(self) -> bytes:
        if not self._done:
            raise _bad("the multipart body ends before its closing boundary (truncated)")
        if self._value is None:
            raise ImageRejected(
                "empty_body",
                f"multipart body has no field {self._field.decode()!r} (fields: {self._names}); send the image as 'file'",
            )
        return self._value


def _bad(message: str) -> ImageRejected:
    return ImageRejected("bad_multipart", message)


def _too_large(limits: BodyLimits, length: Optional[int] = None) -> ImageRejected:
    what = f"has {length} bytes" if length is not None else "exceeds the limit"
    return ImageRejected("body_too_large", f"the request body {what}, more than {limits.max_bytes} bytes allowed")


def content_length(value: Optional[str]) -> Optional[int]:
    """The declared body length, None when absent; a malformed header is a 400."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 15:
        raise ImageRejected("bad_request", f"Content-Length must be a non-negative integer, got {value[:40]!r}")
    return int(value)


async def _drain(stream: AsyncIterator[bytes], limits: BodyLimits, already: int) -> None:
    """Read and drop what is left of a too-large body, within the drain bounds."""
    deadline = time.monotonic() + limits.drain_timeout_s
    n = already
    try:
        async for chunk in stream:
            n += len(chunk)
            if n > limits.drain_bytes or time.monotonic() > deadline:
                return
    except Exception:  # noqa: BLE001 - already consumed, or the client went away: nothing left to drain
        return


async def _read(stream: AsyncIterator[bytes], content_type: str, length: Optional[int], limits: BodyLimits) -> bytes:
    n = 0
    try:
        multipart = _MultipartField(content_type, "file", limits) if _is_multipart(content_type) else None
        chunks: list[bytes] = []
        async for chunk in stream:
            n += len(chunk)
            if n > limits.max_bytes:
                raise _too_large(limits, length)
            if multipart is not None:
                multipart.feed(chunk)
            else:
                chunks.append(chunk)
        return multipart.value() if multipart is not None else b"".join(chunks)
    except ImageRejected:
        await _drain(stream, limits, n)  # the client may still be sending: let it finish, then answer
        raise


def _is_multipart(content_type: str) -> bool:
    return content_type.lower().lstrip().startswith("multipart/form-data")


async def read_body(
    stream: AsyncIterator[bytes], content_type: str, length_header: Optional[str], limits: BodyLimits
) -> bytes:
    """The image bytes of a request: the raw body, or multipart field ``file``.

    Raises :class:`ImageRejected` for every problem (size, time, structure), never anything else.
    """
    length = content_length(length_header)
    if length is not None and length > limits.max_bytes:
        if length <= limits.drain_bytes:
            try:
                await asyncio.wait_for(_drain(stream, limits, 0), limits.drain_timeout_s)
            except TimeoutError:
                pass
        raise _too_large(limits, length)
    try:
        return await asyncio.wait_for(_read(stream, content_type, length, limits), limits.read_timeout_s)
    except TimeoutError:
        raise ImageRejected(
            "body_timeout", f"the request body did not arrive within {limits.read_timeout_s:g} s"
        ) from None
    except ImageRejected:
        raise
    except Exception as err:  # noqa: BLE001 - a client disconnect or a parser bug: still the client's 4xx
        raise ImageRejected("bad_request", f"the request body could not be read: {type(err).__name__}") from None
