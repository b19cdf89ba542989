"""One object-store interface for everything segloop persists outside MLflow.

Two implementations share the :class:`ObjectStore` interface:

* :class:`LocalStore` - a plain directory, the embedded default (no server needed);
* :class:`S3Store` - any S3-compatible server (MinIO, AWS, moto) through the ``minio`` SDK.

Keys are ``/``-separated relative paths. The same rules hold for both stores so a
layout that works locally works on S3: no absolute paths, no ``.``/``..`` or empty
components, no backslashes or NUL characters (see :func:`check_key`).

Layout of a store::

    captures/<yyyy-mm-dd>/<id>.<ext>        a production input kept for labelling/retraining
    captures/<yyyy-mm-dd>/<id>.json         its metadata (model, prediction summary, drift scores, ...)
    datasets/<name>/<version>.json          immutable dataset-version manifests (dataplane.versions)
    datasets/<name>/lineage/<parent>.json   which version continues <parent> ("root": the first one);
                                            created once with put_if_absent, never rewritten
    datasets/<name>/lineage/HEAD.json       a hint: the last head written (may lag; see versions)
    blobs/sha256/<aa>/<sha256>              content-addressed file contents (<aa> = first 2 hex chars)
    exports/<time>-<id>.json                what one annotation export sent to annotators (kept by retention)
    control/capture_policy.json             the capture policy the replicas follow (dataplane.capture)

:func:`capture_keys`, :func:`manifest_key`, :func:`lineage_key`, :func:`head_key` and
:func:`blob_key` build these keys so no caller spells them by hand.

Conditional writes: :meth:`ObjectStore.put_if_absent` creates a key only when it does not
exist, atomically (LocalStore: ``os.link`` of a finished temp file, which fails when the
name exists; S3Store: PutObject with ``If-None-Match: *``, answered 412 PreconditionFailed
by AWS S3 since 2024-08 and MinIO, atomically; moto 5.2 answers 412 too, but checks in
Python before writing, without a lock, so it is not guaranteed atomic under load). An S3
server that ignores the header is detected once per S3Store by a probe and refused with
ConditionalWritesUnsupported, instead of silently overwriting.

Credentials never live in config files: :func:`open_store` reads them from
``SEGLOOP_S3_ACCESS_KEY``/``SEGLOOP_S3_SECRET_KEY``, falling back to
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and ``MINIO_ROOT_USER``/``MINIO_ROOT_PASSWORD``.
"""

from __future__ import annotations

import abc
import datetime as _dt
import io
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, model_validator

from segloop.errors import ConfigError, StoreError

DEFAULT_LOCAL_ROOT = ".segloop/store"  # segloop.settings: <DEFAULT_DATA_DIR>/store
# Prefix of in-flight temp files of LocalStore; never a valid key component, never listed.
_TMP_PREFIX = ".segloop-tmp-"

CREDENTIAL_ENV_PAIRS: tuple[tuple[str, str], ...] = (
    ("SEGLOOP_S3_ACCESS_KEY", "SEGLOOP_S3_SECRET_KEY"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
)


class ObjectNotFound(StoreError):
    """The requested key does not exist in the store."""


class ConditionalWritesUnsupported(StoreError):
    """The store cannot create a key only-if-absent atomically (an S3 server ignoring If-None-Match)."""


# --------------------------------------------------------------------------- keys


def check_key(key: Any) -> str:
    """Return ``key`` if it is a safe relative '/'-path, else raise StoreError.

    Refused (so a key can never escape a LocalStore root, and S3 and local layouts
    agree): non-strings, empty keys, absolute paths, backslashes, NUL, empty,
    ``.`` or ``..`` components, and LocalStore's temp-file prefix.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {key!r}: expected a non-empty string like 'a/b.json'")
    _check_chars(key, "key")
    if key.startswith("/"):
        raise StoreError(f"invalid store key {key!r}: absolute paths are not allowed")
    for part in key.split("/"):
        _check_component(key, part, "key")
    return key


def check_prefix(prefix: Any) -> str:
    """Validate a listing prefix: like a key, but may be empty or end with '/'."""
    if prefix is None or prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise StoreError(f"invalid store prefix {prefix!r}: expected a string")
    _check_chars(prefix, "prefix")
    if prefix.startswith("/"):
        raise StoreError(f"invalid store prefix {prefix!r}: absolute paths are not allowed")
    if prefix.endswith("/"):
        full, last = prefix[:-1].split("/"), None
    else:
        *full, last = prefix.split("/")
    for part in full:
        _check_component(prefix, part, "prefix")
    if last in (".", ".."):
        _check_component(prefix, last, "prefix")
    return prefix


def _check_chars(key: str, what: str) -> None:
    if "\\" in key:
        raise StoreError(f"invalid store {what} {key!r}: backslashes are not allowed, use '/'")
    if "\x00" in key:
        raise StoreError(f"invalid store {what} {key!r}: NUL characters are not allowed")


def _check_component(key: str, part: str, what: str) -> None:
    if part == "":
        raise StoreError(f"invalid store {what} {key!r}: empty path component ('//' or trailing '/')")
    if part in (".", ".."):
        raise StoreError(f"invalid store {what} {key!r}: '.' and '..' components are not allowed")
    if part.startswith(_TMP_PREFIX):
        raise StoreError(f"invalid store {what} {key!r}: components may not start with {_TMP_PREFIX!r}")


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CAPTURE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_EXT = re.compile(r"^[A-Za-z0-9]{1,10}$")


EXPORTS_PREFIX = "exports/"


def blob_key(sha256: str) -> str:
    """Key of the content-addressed blob holding bytes whose sha256 is ``sha256``."""
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise StoreError(f"invalid sha256 {sha256!r}: expected 64 lowercase hex characters")
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def manifest_key(name: str, version: str) -> str:
    """Key of the manifest of dataset ``name`` at ``version``."""
    return check_key(f"datasets/{name}/{version}.json")


def lineage_key(name: str, parent: Optional[str]) -> str:
    """Key of the record naming the version that continues ``parent`` (None: the first version)."""
    return check_key(f"datasets/{name}/lineage/{parent or 'root'}.json")


def head_key(name: str) -> str:
    """Key of the head hint of dataset ``name`` (a plain write; the lineage records are the truth)."""
    return check_key(f"datasets/{name}/lineage/HEAD.json")


def capture_keys(capture_id: str, ext: str, when: Optional[_dt.datetime | _dt.date] = None) -> tuple[str, str]:
    """``(data_key, metadata_key)`` of a capture taken at ``when`` (default: now, UTC)."""
    if not isinstance(capture_id, str) or not _CAPTURE_ID.match(capture_id):
        raise StoreError(f"invalid capture id {capture_id!r}: expected [A-Za-z0-9._-], at most 128 chars")
    ext = ext.lstrip(".") if isinstance(ext, str) else ext
    if not isinstance(ext, str) or not _EXT.match(ext):
        raise StoreError(f"invalid capture extension {ext!r}: expected letters/digits like 'jpg'")
    if ext.lower() == "json":
        raise StoreError("a capture's data extension cannot be 'json' (the metadata uses it)")
    when = when or _dt.datetime.now(_dt.UTC)
    if isinstance(when, _dt.datetime) and when.tzinfo is not None:
        when = when.astimezone(_dt.UTC)
    day = when.strftime("%Y-%m-%d")
    return f"captures/{day}/{capture_id}.{ext}", f"captures/{day}/{capture_id}.json"


# --------------------------------------------------------------------------- interface


class ObjectStore(abc.ABC):
    """Minimal key -> bytes store. Implementations raise StoreError for every failure."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: Optional[str] = None) -> None:
        """Store ``data`` under ``key`` (replacing any previous object atomically)."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes, content_type: Optional[str] = None) -> bool:
        """Create ``key`` holding ``data`` only if no object is stored there, atomically.

        True when this call created it, False when the key already existed (then the
        stored object is left untouched). False can also follow a retried request whose
        first attempt did create it: callers compare the stored content, not just the bool.
        """

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFound when it does not exist."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Iterate over the keys starting with ``prefix`` (a plain string prefix), sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A URL-ish description for logs and error messages (never holds secrets)."""

    @abc.abstractmethod
    def ping(self, *, require_bucket: bool = False) -> None:
        """Raise StoreError when the store cannot be used right now (``require_bucket``: an S3
        bucket that does not exist yet counts, instead of being created on first write)."""

    def url_for(self, key: str) -> str:
        """A URL naming ``key`` in this store (for lineage records; no secrets)."""
        return f"{self.describe()}/{check_key(key)}"

    def put_json(self, key: str, obj: Any) -> None:
        """Store ``obj`` as pretty, key-sorted JSON (stable bytes for equal objects)."""
        self.put_bytes(key, self._json_bytes(key, obj), content_type="application/json")

    def put_json_if_absent(self, key: str, obj: Any) -> bool:
        """:meth:`put_if_absent` of ``obj`` as :meth:`put_json` would store it."""
        return self.put_if_absent(key, self._json_bytes(key, obj), content_type="application/json")

    def _json_bytes(self, key: str, obj: Any) -> bytes:
        try:
            data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as err:
            raise StoreError(f"cannot store {key!r} in {self.describe()}: not JSON-serialisable: {err}") from None
        return data + b"\n"

    def get_json(self, key: str) -> Any:
        """Load a JSON object stored with :meth:`put_json`."""
        data = self.get_bytes(key)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise StoreError(f"object {key!r} in {self.describe()} is not valid JSON: {err}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


# --------------------------------------------------------------------------- local


class LocalStore(ObjectStore):
    """A directory on the local file system; writes are atomic (temp file + os.replace)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create local store directory {self.root}: {err.strerror or err}") from None
        if not self.root.is_dir():
            raise StoreError(f"local store root {self.root} is not a directory")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def describe(self) -> str:
        return f"file://{self.root}"

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def ping(self, *, require_bucket: bool = False) -> None:
        if not self.root.is_dir():
            raise StoreError(f"local store {self.root} does not exist or is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"local store {self.root} is not writable")

    def put_bytes(self, key: str, data: bytes, content_type: Optional[str] = None) -> None:
        self._write(key, data, exclusive=False)

    def put_if_absent(self, key: str, data: bytes, content_type: Optional[str] = None) -> bool:
        """Hard-link a finished temp file to the key: link(2) fails when the name exists, so
        exactly one of several writers (threads, processes, hosts on one NFS export) wins and
        a reader never sees a half-written object."""
        return self._write(key, data, exclusive=True)

    def _write(self, key: str, data: bytes, *, exclusive: bool) -> bool:
        """Write ``data`` to a temp file next to the key's path, then rename it over the path
        (``exclusive``: hard-link it instead; False when the path already exists)."""
        path = self._path(key)
        _check_data(key, data)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            if not exclusive:
                os.replace(tmp, path)
                tmp = None
                return True
            try:
                os.link(tmp, path)  # the temp name is unlinked below
            except FileExistsError:
                return False
            return True
        except OSError as err:
            raise StoreError(f"cannot write {key!r} to {self.describe()}: {err.strerror or err}") from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
        except OSError as err:
            raise StoreError(f"cannot read {key!r} from {self.describe()}: {err.strerror or err}") from None

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as err:
            raise StoreError(f"cannot check {key!r} in {self.describe()}: {err.strerror or err}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        prefix = check_prefix(prefix)
        # Walk only the deepest directory the prefix fully names.
        base_parts = prefix.split("/")[:-1]
        base = self.root.joinpath(*base_parts)
        keys: list[str] = []
        if base.is_dir():
            try:
                for dirpath, dirnames, filenames in os.walk(base, onerror=_raise):
                    dirnames[:] = [d for d in dirnames if not d.startswith(_TMP_PREFIX)]
                    rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                    for fn in filenames:
                        if fn.startswith(_TMP_PREFIX):
                            continue
                        key = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                        if key.startswith(prefix):
                            keys.append(key)
            except OSError as err:
                raise StoreError(f"cannot list {prefix!r} in {self.describe()}: {err.strerror or err}") from None
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as err:
            raise StoreError(f"cannot delete {key!r} from {self.describe()}: {err.strerror or err}") from None
        # Drop now-empty parent directories (never the root) so listings stay cheap.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _check_data(key: str, data: Any) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StoreError(f"cannot store {key!r}: data must be bytes, got {type(data).__name__}")


def _raise(err: OSError) -> None:
    raise err


# --------------------------------------------------------------------------- S3


class S3Store(ObjectStore):
    """A bucket on an S3-compatible server, through the ``minio`` SDK.

    The bucket is created on first use when missing. The HTTP client uses short
    timeouts and a single retry so an unreachable server fails within seconds
    instead of minio's default minutes.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: Optional[str] = None,
        secret_key: Optional[str] = None,
        secure: bool = False,
        region: Optional[str] = None,
        *,
        timeout: float = 5.0,
        retries: int = 1,
    ) -> None:
        import certifi
        import urllib3
        from minio import Minio
        from minio.helpers import check_bucket_name

        host, secure = _parse_endpoint(endpoint, secure)
        try:
            check_bucket_name(bucket)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"invalid S3 bucket name {bucket!r}: {err}") from None
        if bool(access_key) != bool(secret_key):
            raise ConfigError("S3 credentials need both an access key and a secret key")
        self.endpoint = host
        self.bucket = bucket
        self.secure = secure
        self.region = region
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 3.0), read=max(timeout, 1.0)),
            retries=urllib3.Retry(
                total=retries,
                connect=retries,
                read=retries,
                backoff_factor=0.1,
                status_forcelist=[500, 502, 503, 504],
                raise_on_status=False,
            ),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        try:
            self._client = Minio(
                host,
                access_key=access_key or None,
                secret_key=secret_key or None,
                secure=secure,
                region=region,
                http_client=http,
            )
        except ValueError as err:
            raise ConfigError(f"invalid S3 endpoint {endpoint!r}: {err}") from None
        self._bucket_ready = False
        self._conditional_ok = False
        self._lock = threading.Lock()

    # -- helpers

    def describe(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"s3://{self.bucket} at {scheme}://{self.endpoint}"

    @contextmanager
    def _errors(self, op: str, key: str = ""):
        """Turn minio/urllib3/socket errors into one StoreError naming the operation."""
        import urllib3
        from minio.error import MinioException, S3Error

        what = f"{op} {key!r}" if key else op
        where = f"S3 store {self.endpoint} bucket {self.bucket!r}"
        try:
            yield
        except StoreError:
            raise
        except S3Error as err:
            if err.code in ("NoSuchKey", "NotFound"):
                raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
            raise StoreError(f"{where}: {what} failed: {err.code}: {err.message}") from None
        except MinioException as err:
            raise StoreError(f"{where}: {what} failed: {err}") from None
        except urllib3.exceptions.MaxRetryError as err:
            reason = err.reason or err
            raise StoreError(f"{where}: {what} failed, server unreachable: {_short(reason)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise StoreError(f"{where}: {what} failed: {_short(err)}") from None

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from minio.error import S3Error

        with self._lock:
            if self._bucket_ready:
                return
            with self._errors("create bucket"):
                if not self._client.bucket_exists(self.bucket):
                    try:
                        self._client.make_bucket(self.bucket, location=self.region)
                    except S3Error as err:
                        if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
            self._bucket_ready = True

    # -- interface

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def ping(self, *, require_bucket: bool = False) -> None:
        with self._errors("ping"):
            found = self._client.bucket_exists(self.bucket)
        if require_bucket and not found:
            raise StoreError(
                f"S3 store {self.endpoint}: bucket {self.bucket!r} does not exist; "
                "create it (e.g. `mc mb`) or fix SEGLOOP_STORE"
            )

    def put_bytes(self, key: str, data: bytes, content_type: Optional[str] = None) -> None:
        check_key(key)
        _check_data(key, data)
        data = bytes(data)
        self._ensure_bucket()
        with self._errors("put", key):
            self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type or "application/octet-stream",
            )

    def put_if_absent(self, key: str, data: bytes, content_type: Optional[str] = None) -> bool:
        """PutObject with ``If-None-Match: *``: the server answers 412 PreconditionFailed when
        the key exists. The first call on this store probes that the server honours it."""
        check_key(key)
        _check_data(key, data)
        self._ensure_bucket()
        self._check_conditional_writes()
        return self._create(key, bytes(data), content_type)

    def _create(self, key: str, data: bytes, content_type: Optional[str]) -> bool:
        """One create-only PutObject. minio's public put_object turns extra headers into
        x-amz-meta-* metadata, so this sends its PutObject request (``_put_object``) itself.
        AWS answers 409 ConditionalRequestConflict while a competing conditional write is in
        flight: that is retried a few times, after which the answer is 200 or 412."""
        from minio.error import S3Error

        headers = {"Content-Type": content_type or "application/octet-stream", "If-None-Match": "*"}
        for attempt in range(4):
            with self._errors("conditional put", key):
                try:
                    self._client._put_object(self.bucket, key, data, headers=headers)
                    return True
                except S3Error as err:
                    if err.code == "PreconditionFailed":
                        return False
                    if err.code != "ConditionalRequestConflict" or attempt == 3:
                        raise
            time.sleep(0.05 * 2**attempt)
        return False  # pragma: no cover - the loop returns or raises

    def _check_conditional_writes(self) -> None:
        """Once per store: create a probe key twice. A server that lets the second create
        through ignores If-None-Match, and conditional writes would silently overwrite."""
        if self._conditional_ok:
            return
        with self._lock:
            if self._conditional_ok:
                return
            probe = f"_segloop/probe/{uuid.uuid4().hex}"
            try:
                first, second = self._create(probe, b"1", None), self._create(probe, b"2", None)
            finally:
                self.delete(probe)
            if not first or second:
                raise ConditionalWritesUnsupported(
                    f"S3 store {self.endpoint} bucket {self.bucket!r} ignores If-None-Match on PutObject "
                    "(a second create-only write of a probe key went through): dataset lineage needs "
                    "create-only writes; use AWS S3, MinIO or another server with conditional writes"
                )
            self._conditional_ok = True

    def get_bytes(self, key: str) -> bytes:
        check_key(key)
        self._ensure_bucket()
        with self._errors("get", key):
            resp = self._client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def exists(self, key: str) -> bool:
        check_key(key)
        self._ensure_bucket()
        try:
            with self._errors("stat", key):
                self._client.stat_object(self.bucket, key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        prefix = check_prefix(prefix)
        self._ensure_bucket()
        with self._errors("list", prefix):
            keys = [
                o.object_name
                for o in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
                if o.object_name and not o.is_dir
            ]
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        check_key(key)
        self._ensure_bucket()
        try:
            with self._errors("delete", key):
                self._client.remove_object(self.bucket, key)
        except ObjectNotFound:
            pass


def _parse_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """'host:port', 'http://host:port' or 'https://host' -> (host[:port], secure)."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigError(f"invalid S3 endpoint {endpoint!r}: expected host[:port] or http(s)://host[:port]")
    endpoint = endpoint.strip()
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"invalid S3 endpoint {endpoint!r}: scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"invalid S3 endpoint {endpoint!r}: must not contain a path")
        if parts.username or parts.password:
            raise ConfigError("S3 endpoint must not contain credentials; use SEGLOOP_S3_ACCESS_KEY/SECRET_KEY")
        return parts.netloc, parts.scheme == "https"
    if "/" in endpoint or "@" in endpoint:
        raise ConfigError(f"invalid S3 endpoint {endpoint!r}: expected host[:port]")
    return endpoint, bool(secure)


def _short(err: object) -> str:
    text = str(err)
    # urllib3 reprs carry the connection object; keep the human part.
    m = re.search(r"(\[Errno -?\d+\][^')\"]*|Connection refused|timed out|Read timed out)", text)
    return m.group(0).strip() if m else text[:300]


# --------------------------------------------------------------------------- config


class StoreConfig(BaseModel):
    """Where segloop keeps captures, dataset manifests and blobs (no credentials here)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "s3"] = "local"
    root: str = DEFAULT_LOCAL_ROOT
    endpoint: Optional[str] = None
    bucket: Optional[str] = None
    secure: bool = False
    region: Optional[str] = None
    timeout: float = 5.0

    # Checked before pydantic sees the data: a ValidationError would echo the secret values.
    def __init__(self, /, **data: Any) -> None:
        _reject_credentials(data)
        super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> StoreConfig:
        _reject_credentials(obj)
        return super().model_validate(obj, *args, **kwargs)

    @model_validator(mode="after")
    def _s3_fields(self) -> StoreConfig:
        if self.kind == "s3":
            missing = [f for f in ("endpoint", "bucket") if not getattr(self, f)]
            if missing:
                raise ValueError(f"an s3 store needs {' and '.join(missing)}")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        return self


def _reject_credentials(data: Any) -> None:
    if not isinstance(data, Mapping):
        return
    bad = sorted(
        k
        for k in data
        if isinstance(k, str)
        and any(w in k.lower() for w in ("access_key", "secret", "password", "token", "credential"))
    )
    if bad:
        raise ConfigError(
            f"store config: credentials do not belong in config files (found {', '.join(bad)}); "
            "set SEGLOOP_S3_ACCESS_KEY and SEGLOOP_S3_SECRET_KEY in the environment"
        )


def s3_credentials(env: Optional[Mapping[str, str]] = None) -> tuple[Optional[str], Optional[str]]:
    """The first complete (access, secret) pair from the environment, or (None, None)."""
    env = os.environ if env is None else env
    for access_var, secret_var in CREDENTIAL_ENV_PAIRS:
        access, secret = env.get(access_var), env.get(secret_var)
        if access and secret:
            return access, secret
    return None, None


def open_store(
    cfg: StoreConfig | Mapping[str, Any] | None = None, env: Optional[Mapping[str, str]] = None
) -> ObjectStore:
    """Build the store a config describes (credentials from ``env``, default os.environ)."""
    if cfg is None:
        cfg = StoreConfig()
    elif not isinstance(cfg, StoreConfig):
        from segloop.config import validate

        cfg = validate(StoreConfig, dict(cfg), source="store config")
    if cfg.kind == "local":
        return LocalStore(cfg.root)
    access, secret = s3_credentials(env)
    if not access:
        names = ", ".join(f"{a}/{s}" for a, s in CREDENTIAL_ENV_PAIRS)
        raise ConfigError(f"no S3 credentials for {cfg.endpoint}: set one of {names}")
    return S3Store(
        cfg.endpoint or "",
        cfg.bucket or "",
        access,
        secret,
        secure=cfg.secure,
        region=cfg.region,
        timeout=cfg.timeout,
    )


def store_config_from_url(url: str, env: Optional[Mapping[str, str]] = None) -> StoreConfig:
    """``s3://bucket`` (endpoint from SEGLOOP_S3_ENDPOINT) or a local path / ``file://`` URL."""
    env = os.environ if env is None else env
    url = (url or "").strip()
    if not url:
        return StoreConfig(kind="local", root=DEFAULT_LOCAL_ROOT)
    if url.startswith("s3://"):
        bucket = url[len("s3://") :].rstrip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"invalid store URL {url!r}: expected s3://<bucket> (no key prefix)")
        endpoint = env.get("SEGLOOP_S3_ENDPOINT", "").strip()
        if not endpoint:
            raise ConfigError(f"store {url!r} needs SEGLOOP_S3_ENDPOINT (host:port or http(s)://host:port)")
        secure = env.get("SEGLOOP_S3_SECURE", "").strip().lower() in ("1", "true", "yes", "on")
        data = {"kind": "s3", "endpoint": endpoint, "bucket": bucket, "secure": secure}
        if env.get("SEGLOOP_S3_REGION"):
            data["region"] = env["SEGLOOP_S3_REGION"]
    else:
        if "://" in url and not url.startswith("file://"):
            raise ConfigError(f"invalid store URL {url!r}: expected a local path, file://PATH or s3://BUCKET")
        root = url[len("file://") :] if url.startswith("file://") else url
        data = {"kind": "local", "root": root}
    from segloop.config import validate

    return validate(StoreConfig, data, source=f"store {url!r}")


def store_from_env(env: Optional[Mapping[str, str]] = None) -> ObjectStore:
    """The store named by SEGLOOP_STORE (local path or s3://bucket), default ./.segloop/store."""
    env = os.environ if env is None else env
    return open_store(store_config_from_url(env.get("SEGLOOP_STORE", ""), env), env)


def run_store_command(url: Optional[str], command: Callable[[ObjectStore], Any]) -> int:
    """What the ``segloop queue`` / ``segloop versions`` subcommands share: open the store
    (``--store``, else SEGLOOP_STORE, else the default), run, map errors to exit codes."""
    from segloop.errors import SegloopError, cli_error

    try:
        command(open_store(store_config_from_url(url or os.environ.get("SEGLOOP_STORE", ""))))
    except SegloopError as err:
        return cli_error(err)
    return 0
