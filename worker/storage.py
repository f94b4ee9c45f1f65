"""Where PNGs go: an S3 bucket (any S3-compatible server) or a local folder.

The only module that knows boto3 and obstore (the two S3 clients, ``ACTMAP_S3_CLIENT``). Every
PUT carries a checksum of its body (boto3: Content-MD5; obstore: x-amz-checksum-sha256), so a
body corrupted on the way is refused by the server (BadDigest) rather than stored, and retried.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from producer.errors import ConfigError, InvalidImageIdError, StorageError, StorageRejectedError
from producer.settings import Settings
from worker.budget import longest_put_s

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from obstore.store import ClientConfig, S3Config

_MAX_FOLDERS = 4096  # folders FileStorage remembers as resolved and made
# FileStorage's temporary files: ".<name>.<pid>-<thread id>.tmp", beside the map they become
# (a name too long for that: its first 100 bytes and a hash of it, "<start>~<16 hex>").
_TEMPORARY = re.compile(r"\..+\.\d+-\d+\.tmp")
_MAX_NAME_BYTES = 255  # a file name, on Linux's file systems
# Local write errors a retry cannot fix: a file where a folder must go or the other way
# round, no permission, a read-only file system. (A link planted at a temporary name, ELOOP
# with O_NOFOLLOW, is not one: a retry from another process or thread uses another name.)
_PERMANENT_ERRNOS = frozenset(
    {errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS}
)

# Error codes retrying cannot fix: the bucket is missing or the credentials are refused.
_PERMANENT_S3_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "NoSuchBucket", "InvalidBucketName", "SignatureDoesNotMatch"}
)
# A server certificate the client does not trust: a retry meets the same certificate and the same trust.
# rustls's verdict, as obstore's error text gives it on a line of its own (a key holds no line break,
# so a key naming it cannot match).
_OBSTORE_UNTRUSTED = re.compile(r"^\s*error: InvalidCertificate\(\s*(\w+)", re.MULTILINE)
_TRUST_EXPECTED = (
    "expected a certificate signed by a CA of AWS_CA_BUNDLE (or ca_bundle in the AWS config file) "
    "or of the system trust store"
)


@dataclass(frozen=True)
class StoredObject:
    locator: str
    size: int
    checksum: str  # "md5:<hex>"; for a single-part S3 PUT it equals the object's ETag


class Storage(Protocol):
    # Whether a PUT mostly waits (on a network): worth a thread, so the next map renders meanwhile.
    waits_on_network: bool

    def put(self, key: str, data: bytes) -> StoredObject: ...

    def locator(self, key: str) -> str: ...


class FileStorage:
    """A local folder; ``file://`` locators. Writes are atomic: a reader never sees half a PNG."""

    waits_on_network = False  # a few system calls: cheaper than handing the PNG to a thread

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        # Per folder, not per map: its resolved path (a realpath costs a syscall per path
        # component) and whether it was made already (one mkdir). Forgotten past _MAX_FOLDERS.
        self._resolved: dict[Path, Path] = {}
        self._folders: set[Path] = set()

    def locator(self, key: str) -> str:
        return self._path(key).as_uri()

    def put(self, key: str, data: bytes) -> StoredObject:
        path = self._path(key)
        tmp = path.with_name(_temporary_name(path.name))
        try:
            handle = self._create(tmp)
            try:
                try:
                    _write_all(handle, data)
                finally:
                    os.close(handle)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidImageIdError(f"object key {key!r} is too long for {self.root}") from exc
            if exc.errno in _PERMANENT_ERRNOS:
                raise StorageRejectedError(
                    f"could not write {path}: {exc}; a retry cannot change that (a file where a folder "
                    "must go, or a folder where the file must, no permission, or a read-only file system)"
                ) from exc
            raise StorageError(f"could not write {path}: {exc}") from exc
        return StoredObject(path.as_uri(), len(data), _md5(data)[0])

    def sweep_temporary_files(self, older_than_s: float) -> tuple[int, int]:
        """Delete the temporary files of writes cut short (a worker killed mid-write) older
        than ``older_than_s``; returns (files, bytes). A write under way takes milliseconds."""
        cutoff = time.time() - older_than_s
        files = size = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                if not _TEMPORARY.fullmatch(name):
                    continue
                path = os.path.join(folder, name)
                try:
                    stat = os.lstat(path)
                    if stat.st_mtime < cutoff:
                        os.unlink(path)
                        files, size = files + 1, size + stat.st_size
                except FileNotFoundError:
                    pass  # renamed into place or swept by another process meanwhile
        return files, size

    def _create(self, tmp: Path) -> int:
        if tmp.parent not in self._folders:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            if len(self._folders) >= _MAX_FOLDERS:
                self._folders.clear()
            self._folders.add(tmp.parent)
        # O_NOFOLLOW: a link planted at the temporary name is not followed out of the folder.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            # 0o666 less the umask, as for any new file: a PNG is for viewers and servers.
            return os.open(tmp, flags, 0o666)
        except FileNotFoundError:  # the folder was removed since: make it again
            tmp.parent.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, flags, 0o666)

    def _path(self, key: str) -> Path:
        path = self.root / key
        # The root itself is no object's place: its temporary file would go outside it.
        if path == self.root or path.name in ("", ".", ".."):
            raise InvalidImageIdError(f"object key {key!r} resolves outside {self.root}")
        folder = self._resolved.get(path.parent)
        if folder is None:
            # keys.object_key already refuses escaping ids; this guards against a link in the
            # tree. The file itself needs no resolving: a rename replaces a link, never follows it.
            folder = path.parent.resolve()
            if not folder.is_relative_to(self.root):
                raise InvalidImageIdError(f"object key {key!r} resolves outside {self.root}")
            if len(self._resolved) >= _MAX_FOLDERS:
                self._resolved.clear()
            self._resolved[path.parent] = folder
        return folder / path.name


class S3Storage:
    """An S3 bucket and prefix; ``s3://bucket/key`` locators."""

    waits_on_network = True

    def __init__(self, client: S3Client, bucket: str, server_side_encryption: str | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.server_side_encryption = server_side_encryption

    def locator(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> StoredObject:
        from botocore.exceptions import BotoCoreError, ClientError, SSLError

        checksum, content_md5 = _md5(data)
        extra = {"ServerSideEncryption": self.server_side_encryption} if self.server_side_encryption else {}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType="image/png",
                ContentMD5=content_md5,
                **extra,  # type: ignore[arg-type]
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            message = f"PUT {self.locator(key)} refused: {code}: {exc}"
            if code in _PERMANENT_S3_CODES:
                raise StorageRejectedError(message) from exc
            raise StorageError(message) from exc
        except SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise _untrusted(self.locator(key), str(exc)) from exc
            raise StorageError(f"PUT {self.locator(key)} failed: {type(exc).__name__}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"PUT {self.locator(key)} failed: {type(exc).__name__}: {exc}") from exc
        return StoredObject(self.locator(key), len(data), checksum)


def _untrusted(locator: str, reason: str) -> StorageRejectedError:
    return StorageRejectedError(
        f"PUT {locator} refused: the S3 server's TLS certificate is not trusted ({reason}); {_TRUST_EXPECTED}"
    )


class ObstoreS3Storage:
    """An S3 bucket through obstore (Rust's object_store crate): the same PUT as ``S3Storage``
    for a fraction of boto3's CPU (``ACTMAP_S3_CLIENT=obstore``; docs/performance.md).

    Credentials still come from boto3's chain (obstore's boto3 credential provider). Every PUT
    carries x-amz-checksum-sha256, so a body corrupted on the way is refused (BadDigest) rather
    than stored, and retried, as Content-MD5 does for boto3. The SHA-256 a signed payload already
    carries is not enough: S3-compatible servers need not check it (SeaweedFS does not).
    """

    waits_on_network = True

    def __init__(self, store: Any, bucket: str) -> None:
        self.store = store
        self.bucket = bucket

    def locator(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> StoredObject:
        import obstore
        from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError

        try:
            obstore.put(self.store, key, data, attributes={"Content-Type": "image/png"}, use_multipart=False)
        except (NotFoundError, PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageRejectedError(
                f"PUT {self.locator(key)} refused: {type(exc).__name__}: {exc}"
            ) from exc
        except BaseError as exc:
            untrusted = _OBSTORE_UNTRUSTED.search(str(exc))
            if untrusted:
                raise _untrusted(self.locator(key), f"InvalidCertificate({untrusted.group(1)})") from exc
            message = f"PUT {self.locator(key)} failed: {type(exc).__name__}: {exc}"
            # The code as the server's XML error body gives it, not anywhere in the text: the
            # text also holds the URL, whose key may contain "AccessDenied".
            if any(f"<Code>{code}</Code>" in str(exc) for code in _PERMANENT_S3_CODES):
                raise StorageRejectedError(message) from exc
            raise StorageError(message) from exc
        return StoredObject(self.locator(key), len(data), _md5(data)[0])


@dataclass(frozen=True)
class StorageLocation:
    storage: Storage
    prefix: str


def storage_url_parts(settings: Settings) -> tuple[str, str, str]:
    """(scheme, folder or bucket, key prefix) of ``settings.effective_storage_url``; ConfigError
    if it cannot work. Pure: a worker checks it as it starts, before any map comes."""
    url = settings.effective_storage_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"storage URL {url!r} names host {parts.netloc!r}; expected file:///absolute/dir"
            )
        return "file", unquote(parts.path), ""
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"storage URL {url!r} has no bucket; expected s3://bucket/prefix")
        return "s3", parts.netloc, parts.path.strip("/")
    raise ConfigError(
        f"storage URL {url!r} has scheme {parts.scheme!r}; expected s3://bucket/prefix or file:///dir"
    )


def open_storage(settings: Settings) -> StorageLocation:
    """The storage and key prefix named by ``settings.effective_storage_url``."""
    scheme, where, prefix = storage_url_parts(settings)
    if scheme == "file":
        return StorageLocation(FileStorage(Path(where)), prefix)
    storage: Storage
    if settings.s3_client == "obstore":
        storage = ObstoreS3Storage(make_obstore_store(settings, where), where)
    else:
        storage = S3Storage(make_s3_client(settings), where, settings.s3_server_side_encryption)
    return StorageLocation(storage, prefix)


def check_ca_bundle(settings: Settings) -> None:
    """ConfigError if the S3 clients would be given a CA bundle (AWS_CA_BUNDLE, or ca_bundle in
    the AWS config file) they cannot use. A worker checks it as it starts: a PUT would fail on it
    for every map, and a retry would fail the same way."""
    if storage_url_parts(settings)[0] != "s3":
        return
    import botocore.session

    ca_bundle = botocore.session.Session().get_config_variable("ca_bundle")
    if ca_bundle:
        _read_ca_bundle(ca_bundle)


def make_s3_client(settings: Settings) -> S3Client:
    """A boto3 S3 client; credentials come from boto3's standard chain only."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": settings.storage_max_attempts},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
    )
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config
    )


def make_obstore_store(settings: Settings, bucket: str) -> Any:
    """An obstore S3 store of ``bucket`` with the settings boto3's client gets: endpoint, region,
    encryption, timeouts per attempt and attempts per PUT, with botocore's backoff between, and
    the CA bundle boto3 trusts (AWS_CA_BUNDLE, or ca_bundle in the AWS config file)."""
    import boto3
    import botocore.session

    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store
    except ImportError as exc:
        raise ConfigError(
            f"ACTMAP_S3_CLIENT=obstore, but obstore is not installed ({exc}); expected the obstore "
            "extra (pip install 'actmap[obstore]') or ACTMAP_S3_CLIENT=boto3"
        ) from exc

    core = botocore.session.Session()
    session = boto3.Session(region_name=settings.s3_region, botocore_session=core)
    config: S3Config = {"region": settings.s3_region or session.region_name or "us-east-1"}
    if settings.s3_endpoint_url:
        # Under the key of AWS_ENDPOINT_URL_S3, which would otherwise win over "endpoint".
        config["aws_endpoint_url_s3"] = settings.s3_endpoint_url
        config["virtual_hosted_style_request"] = False  # path style, as boto3's client here
    # A checksum of the body the server must verify (x-amz-checksum-sha256), as Content-MD5 is for boto3.
    config["checksum_algorithm"] = "SHA256"
    if settings.s3_server_side_encryption:
        config["server_side_encryption"] = settings.s3_server_side_encryption
    attempt_s = settings.s3_connect_timeout_s + settings.s3_read_timeout_s
    client_options: ClientConfig = {
        "allow_http": (settings.s3_endpoint_url or "").startswith("http://"),
        "connect_timeout": timedelta(seconds=settings.s3_connect_timeout_s),
        "timeout": timedelta(seconds=attempt_s),
    }
    ca_bundle = core.get_config_variable("ca_bundle")
    if ca_bundle:
        # obstore reads no AWS_CA_BUNDLE itself. It adds these roots to the system's, where
        # boto3 trusts the bundle alone.
        client_options["root_certificate"] = _read_ca_bundle(ca_bundle)
    return S3Store(
        bucket,
        config=config,
        client_options=client_options,
        retry_config={
            "max_retries": settings.storage_max_attempts - 1,
            "backoff": {
                "init_backoff": timedelta(seconds=1),
                "max_backoff": timedelta(seconds=20),
                "base": 2,
            },
            "retry_timeout": timedelta(seconds=longest_put_s(settings)),
        },
        credential_provider=Boto3CredentialProvider(session),
    )


def _read_ca_bundle(path: str) -> bytes:
    """The PEM certificates of the CA bundle at ``path``; ConfigError if there are none to read."""
    where = "AWS_CA_BUNDLE or ca_bundle in the AWS config file"
    try:
        pem = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the CA bundle {path!r} ({where}): {exc.strerror}; "
            "expected a readable file of PEM certificates"
        ) from exc
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(
            f"the CA bundle {path!r} ({where}) holds no PEM certificate ({len(pem)} bytes); "
            "expected one or more '-----BEGIN CERTIFICATE-----' blocks"
        )
    return pem


def _temporary_name(name: str) -> str:
    """A hidden name beside ``name``, unique per process and thread: concurrent writes of
    the same map never share it. A name too long to take the suffix is shortened, hashed."""
    suffix = f".{os.getpid()}-{threading.get_ident()}.tmp"
    if len(f".{name}{suffix}".encode()) > _MAX_NAME_BYTES:
        digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
        name = f"{name.encode()[:100].decode(errors='ignore')}~{digest}"
    return f".{name}{suffix}"


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(handle, view) :]


def _md5(data: bytes) -> tuple[str, str]:
    digest = hashlib.md5(data, usedforsecurity=False)
    return f"md5:{digest.hexdigest()}", base64.b64encode(digest.digest()).decode("ascii")
