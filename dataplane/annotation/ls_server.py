"""A local Label Studio server for ``make demo``, the tests and a one-machine setup.

Label Studio pins many packages (Django, pyarrow, pytz ...), so it lives in its own
virtual environment (``make label-studio-venv`` creates ``.venv-labelstudio``); segloop
only talks to it over HTTP with ``label-studio-sdk``. The server binds to 127.0.0.1, keeps
its SQLite database and media under ``data_dir``, and serves images from the local store
(local-files storage). Because the object store it reads from is on loopback here, the
server is started with Label Studio's SSRF guard off; it listens on loopback only.

The API key and the login password come from the environment (``LABEL_STUDIO_API_KEY``,
``LABEL_STUDIO_PASSWORD``) or are generated once and kept in ``data_dir/credentials.json``
(mode 0600); they are never printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from segloop.errors import ConfigError, StoreError

API_KEY_ENV = "LABEL_STUDIO_API_KEY"
PASSWORD_ENV = "LABEL_STUDIO_PASSWORD"
USERNAME = "segloop@localhost"
VENV = ".venv-labelstudio"
DATABASE = "label_studio.sqlite3"


@dataclass
class LocalLabelStudio:
    """A running local Label Studio: its URL, API key, data directory and process."""

    url: str
    api_key: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    data_dir: Path
    process: subprocess.Popen = field(repr=False)

    def stop(self, timeout_s: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalLabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_label_studio() -> Path:
    """The ``label-studio`` executable: $SEGLOOP_LABEL_STUDIO, the project's .venv-labelstudio, or PATH."""
    candidates = [os.environ.get("SEGLOOP_LABEL_STUDIO")]
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidates.append(str(base / VENV / "bin" / "label-studio"))
    candidates.append(shutil.which("label-studio"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise ConfigError(
        "Label Studio is not installed: run `make label-studio-venv` (its own virtual environment, "
        f"{VENV}/), or set SEGLOOP_LABEL_STUDIO to a label-studio executable"
    )


def credentials(data_dir: Path) -> tuple[str, str]:
    """``(api_key, password)``: from the environment, else generated once into data_dir/credentials.json."""
    path = data_dir / "credentials.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    key = os.environ.get(API_KEY_ENV) or saved.get("api_key") or secrets.token_hex(20)
    password = os.environ.get(PASSWORD_ENV) or saved.get("password") or secrets.token_urlsafe(12)
    if saved.get("api_key") != key or saved.get("password") != password:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"username": USERNAME, "api_key": key, "password": password}, f)
    return key, password


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_label_studio(
    data_dir: str | os.PathLike, port: Optional[int] = None, timeout_s: float = 180, quiet: bool = False
) -> LocalLabelStudio:
    """Start Label Studio on 127.0.0.1 with its data in ``data_dir``; returns once it answers /health."""
    server = launch_label_studio(data_dir, port)
    wait_until_up(server, timeout_s, quiet)
    return server


def launch_label_studio(data_dir: str | os.PathLike, port: Optional[int] = None) -> LocalLabelStudio:
    """Start the server process and return at once. A new data dir gets a copy of the venv's migrated
    empty database when there is one; otherwise the first start migrates it (~30 s)."""
    exe = find_label_studio()
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    template = exe.parent.parent / "template" / DATABASE  # migrated by `make label-studio-venv`
    if not (data / DATABASE).exists() and template.is_file():
        shutil.copyfile(template, data / DATABASE)  # starts in seconds instead of migrating for ~30 s
    key, password = credentials(data)
    port = port or free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": key,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/",
        # the object store is on loopback here, which Label Studio's SSRF guard refuses; this server
        # listens on loopback only
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data), "--log-level", "WARNING"]
    with open(data / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return LocalLabelStudio(f"http://127.0.0.1:{port}", key, USERNAME, password, data, proc)


def wait_until_up(server: LocalLabelStudio, timeout_s: float = 180, quiet: bool = False) -> None:
    """Wait for /health (a counter on a terminal); StoreError naming the log when it exits or times out."""
    import requests

    t0, tty = time.monotonic(), sys.stderr.isatty()
    log = server.data_dir / "server.log"
    if not quiet and not tty:
        print(f"starting Label Studio on {server.url} (data in {server.data_dir}) ...", file=sys.stderr)
    while time.monotonic() - t0 < timeout_s:
        if server.process.poll() is not None:
            raise StoreError(f"Label Studio exited with code {server.process.returncode}; see {log}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                if not quiet:
                    print(f"\rLabel Studio is up at {server.url} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
                return
        except requests.RequestException:
            pass
        if not quiet and tty:
            print(f"\rstarting Label Studio ... {time.monotonic() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        time.sleep(1)
    server.stop()
    raise StoreError(f"Label Studio did not answer within {timeout_s:g} s; see {log}")
