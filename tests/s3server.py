"""A real S3 server for tests: moto's ThreadedMotoServer on 127.0.0.1 and a free port.

Usage::

    with S3Server() as srv:
        store = S3Store(srv.endpoint, "bucket", srv.access_key, srv.secret_key)

or as a fixture::

    @pytest.fixture(scope="session")
    def s3_server():
        srv = start_s3_server()   # skips the test when moto[server] is missing
        yield srv
        srv.stop()

``stop()`` behaves like a real server going away: it stops accepting, closes the
listening socket *and* drops open keep-alive connections (ThreadedMotoServer.stop
alone leaves the socket bound, so clients would hang until their read timeout, and
lets live connections keep being served).

moto keeps its S3 state per process, shared by every server started here: use a
fresh bucket name per test (:func:`unique_bucket`).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from typing import Any, Optional

ACCESS_KEY = "segloop-test-access"
SECRET_KEY = "segloop-test-secret"


def moto_server_available() -> bool:
    """Whether ``moto[server]`` (werkzeug, flask) can be imported."""
    try:
        from moto.server import ThreadedMotoServer  # noqa: F401
    except Exception:
        return False
    return True


def unique_bucket(prefix: str = "segloop-test") -> str:
    """A bucket name no other test uses (S3 names: lowercase, digits, '-', 3-63 chars)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class S3Server:
    """A moto S3 server in a background thread of this process."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._moto: Any = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """``host:port`` as the minio SDK / S3Store expects it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._moto is not None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        if self._moto is not None:
            return self
        # werkzeug logs every request to stderr; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        moto = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        moto.start()
        server = moto._server  # werkzeug ThreadedWSGIServer, created by start()
        self.host, self.port = moto.get_host_and_port()
        # Track live connections so stop() can drop them like a dying server would.
        orig_finish = server.finish_request

        def finish_request(request: socket.socket, client_address: Any) -> None:
            with self._conns_lock:
                self._conns.add(request)
            try:
                orig_finish(request, client_address)
            finally:
                with self._conns_lock:
                    self._conns.discard(request)

        server.finish_request = finish_request
        self._moto = moto
        return self

    def stop(self) -> None:
        moto, self._moto = self._moto, None
        if moto is None:
            return
        server = moto._server
        moto.stop()  # shutdown() + join the serving thread
        if server is not None:
            server.server_close()  # release the port: new connections are refused
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_s3_server(host: str = "127.0.0.1", port: int = 0, *, skip_if_missing: bool = True) -> S3Server:
    """Start a server; inside pytest, skip (instead of erroring) when moto[server] is missing."""
    if not moto_server_available() and skip_if_missing:
        import pytest

        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    return S3Server(host, port).start()


def make_s3_store(server: S3Server, bucket: Optional[str] = None, **kw: Any):
    """An S3Store on ``server`` with a fresh bucket (created on first use)."""
    from dataplane.store import S3Store

    return S3Store(server.endpoint, bucket or unique_bucket(), server.access_key, server.secret_key, **kw)
