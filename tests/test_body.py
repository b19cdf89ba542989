"""Request bodies read with limits (serve_app.body): every malformed body is a named 4xx, in bounded time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from serve_app.body import BodyLimits, read_body
from serve_app.imaging import ImageRejected

LIMITS = BodyLimits(max_bytes=12 * 2**20, read_timeout_s=2, drain_bytes=64 * 2**20, drain_timeout_s=2)
BOUNDARY = "XyZ123"
CT = f"multipart/form-data; boundary={BOUNDARY}"
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
BOUND_S = 3.0  # every case, however crafted, answers well within this


class Stream:
    """An ASGI-like body stream in chunks, counting what was read (and optionally slow)."""

    def __init__(self, body: bytes, chunk: int = 65536, delay_s: float = 0.0) -> None:
        self.body, self.chunk, self.delay_s, self.read = body, chunk, delay_s, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), self.chunk):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            piece = self.body[i : i + self.chunk]
            self.read += len(piece)
            yield piece


def part(name: str, data: bytes, extra: str = "") -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
    return head + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def run(body: bytes, content_type: str = CT, length: str | None = None, **stream_kw) -> bytes:
    stream = Stream(body, **stream_kw)
    return asyncio.run(read_body(stream.__aiter__(), content_type, length, LIMITS))


def rejected(body: bytes, content_type: str = CT, length: str | None = None, **stream_kw) -> ImageRejected:
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        run(body, content_type, length, **stream_kw)
    assert time.perf_counter() - t0 < BOUND_S, "a malformed body must be refused in bounded time"
    assert 400 <= info.value.status < 500
    return info.value


def test_raw_and_multipart_bodies():
    assert run(IMAGE, "image/png") == IMAGE
    assert run(form(part("note", b"hello"), part("file", IMAGE, '; filename="a.png"'))) == IMAGE
    assert run(form(part("file", IMAGE)), chunk=7) == IMAGE  # boundaries split across chunks
    err = rejected(form(part("note", b"hello")))
    assert err.reason == "empty_body" and "'note'" in err.message and "'file'" in err.message


@pytest.mark.parametrize(
    ("name", "body", "content_type", "reason"),
    [
        # the stdlib email parser recursed on nested comments (a 500 before)
        ("nested parentheses", form(part("file", IMAGE, "; x=" + "(" * 300 + ")" * 300)), CT, None),
        ("20k parts", form(*[part(f"f{i}", b"x") for i in range(20_000)]), CT, "bad_multipart"),
        (
            "20k part header params",
            form(part("file", IMAGE, "".join(f"; p{i}=v" for i in range(20_000)))),
            CT,
            "bad_multipart",
        ),
        (
            "20k content-type params",
            form(part("file", IMAGE)),
            CT + "".join(f"; p{i}=v" for i in range(20_000)),
            "bad_multipart",
        ),
        ("no boundary", form(part("file", IMAGE)), "multipart/form-data", "bad_multipart"),
        ("truncated", form(part("file", IMAGE))[:-40], CT, "bad_multipart"),
        ("garbage", b"\x00\xff" * 100_000, CT, "bad_multipart"),
        (
            "near-boundaries",
            f"--{BOUNDARY}\r\n\r\n".encode() + f"\r\n--{BOUNDARY[:-1]}".encode() * 1_000_000,
            CT,
            "bad_multipart",
        ),
    ],
)
def test_malformed_multipart_is_a_400_in_bounded_time(name, body, content_type, reason):
    if reason is None:  # parses (the comment is just a parameter value) or is refused, never crashes
        t0 = time.perf_counter()
        try:
            assert run(body, content_type) == IMAGE
        except ImageRejected as err:
            assert err.status == 400
        assert time.perf_counter() - t0 < BOUND_S
        return
    err = rejected(body, content_type)
    assert err.reason == reason, (name, err.reason, err.message)
    assert err.message  # names what is wrong


def test_too_large_bodies_are_drained_then_refused():
    big = b"x" * (LIMITS.max_bytes + 5 * 2**20)
    stream = Stream(big)
    with pytest.raises(ImageRejected) as info:
        asyncio.run(read_body(stream.__aiter__(), "image/jpeg", None, LIMITS))
    assert info.value.reason == "body_too_large" and info.value.status == 413
    assert stream.read == len(big), "the rest of the body is read so the client sees the 413, not a reset"
    stream = Stream(big)  # declared too large: drained without keeping anything
    with pytest.raises(ImageRejected):
        asyncio.run(read_body(stream.__aiter__(), "image/jpeg", str(len(big)), LIMITS))
    assert stream.read == len(big)
    huge = Stream(b"x" * (LIMITS.drain_bytes + 2**20))  # beyond the drain bound: refused at once
    with pytest.raises(ImageRejected):
        asyncio.run(read_body(huge.__aiter__(), "image/jpeg", str(len(huge.body)), LIMITS))
    assert huge.read == 0


def test_slow_body_times_out_and_bad_length_is_named():
    err = rejected(IMAGE * 4, "image/png", chunk=1024, delay_s=0.2)
    assert err.reason == "body_timeout" and err.status == 408 and "2 s" in err.message
    err = rejected(IMAGE, "image/png", length="12abc")
    assert err.reason == "bad_request" and "Content-Length" in err.message
