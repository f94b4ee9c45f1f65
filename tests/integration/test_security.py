"""Security on real processes: Redis passwords and TLS, credentials kept out of logs, S3 encryption.

Every server is private and on 127.0.0.1: a redis-server with `requirepass`, a TLS-only redis-server
with a CA made for this module by `openssl`, and the session's SeaweedFS (SigV4, random secret).

The password has characters that must be percent-encoded in a URL (`/ : @ % +`), so the URL forms
users write are exercised, and the log checks look for it both raw and encoded.

kombu keeps one global broker connection pool per (host, port, user, password, db, transport options):
its key ignores the TLS options, and later producers in the same process with other TLS options would
silently reuse the first one's connections. Each TLS scenario here therefore uses its own Redis db.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import redis

from producer import Producer, Settings
from producer.errors import BrokerError
from tests.integration.conftest import Stack
from tests.support.ports import LOOPBACK, free_port
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.tls import TlsFiles, make_ca, make_tls_files
from tests.support.workers import clean_env
from worker.render import render_png

PASSWORD = f"pw/{uuid.uuid4().hex[:16]}:@%+"


def actmap(
    *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The `actmap` CLI in a subprocess, with exactly the settings in ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=clean_env(env),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def closed_port_url(db: int = 0) -> str:
    """A password URL to a port nothing listens on."""
    return f"redis://:{quote(PASSWORD, safe='')}@{LOOPBACK}:{free_port()}/{db}"


def random_map(seed: int, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    with RedisServer(tls=tls_files) as server:
        yield server


def s3_env(s3_server: SeaweedS3, bucket: str) -> dict[str, str]:
    return {
        "ACTMAP_STORAGE_URL": f"s3://{bucket}/maps",
        "ACTMAP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "ACTMAP_S3_SERVER_SIDE_ENCRYPTION": "AES256",
        **s3_server.env(),
    }


@pytest.fixture(scope="module")
def password_stack(
    password_redis: RedisServer, s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """Broker and results on the password Redis, PNGs to SeaweedFS with SSE-S3, one worker."""
    root = tmp_path_factory.mktemp("password-stack")
    bucket = s3_server.create_bucket()
    stack = Stack(
        env={
            "ACTMAP_HOME": str(root / "home"),
            "ACTMAP_BROKER_URL": password_redis.url(0),
            "ACTMAP_RESULT_BACKEND": password_redis.url(1),
            "ACTMAP_LOG_EACH_MAP": "true",  # logs that name the storage, checked for leaked secrets
            **s3_env(s3_server, bucket),
        },
        log_dir=root,
    )
    stack.start_worker(concurrency=1)
    yield stack, bucket
    stack.stop()
    s3_server.delete_bucket(bucket)


@pytest.fixture(scope="module")
def tls_stack(tls_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker and results on the TLS-only Redis (URLs naming the CA), PNGs in a folder, one worker."""
    root = tmp_path_factory.mktemp("tls-stack")
    stack = Stack(
        env={
            "ACTMAP_HOME": str(root / "home"),
            "ACTMAP_BROKER_URL": tls_redis.url(0),
            "ACTMAP_RESULT_BACKEND": tls_redis.url(1),
            "ACTMAP_STORAGE_URL": f"file://{root / 'maps'}",
        },
        log_dir=root,
    )
    stack.start_worker(concurrency=1)
    yield stack
    stack.stop()


# -- 1. a password in the URL ------------------------------------------------------------------------


def test_a_password_in_the_redis_urls_lets_worker_and_producer_through_a_requirepass_server(
    password_stack: tuple[Stack, str], password_redis: RedisServer
) -> None:
    stack, bucket = password_stack
    # The server really wants the password: without it, nothing gets in.
    anonymous = redis.Redis.from_url(f"redis://{LOOPBACK}:{password_redis.port}/0", socket_timeout=5)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()
    assert stack.env["ACTMAP_BROKER_URL"].startswith(f"redis://:{quote(PASSWORD, safe='')}@")

    with stack.producer() as producer:
        result = producer.collect([producer.submit("secret/one", random_map(1))], timeout=60)[0]

    assert result.error is None
    assert result.locator == f"s3://{bucket}/maps/secret/one.png"


def test_a_producer_whose_url_lacks_the_password_is_refused_by_the_broker(
    password_redis: RedisServer, tmp_path: Path
) -> None:
    url = f"redis://{LOOPBACK}:{password_redis.port}/0"
    producer = Producer(
        Settings(
            home=tmp_path, broker_url=url, result_backend=url, background_publish=False, publish_timeout_s=1
        )
    )
    try:
        with pytest.raises(BrokerError, match=r"(?i)auth"):
            producer.submit("refused", random_map(2))
    finally:
        producer.close()


# -- 2. TLS ----------------------------------------------------------------------------------------


def test_rediss_urls_naming_the_ca_carry_maps_end_to_end_to_a_tls_only_redis(
    tls_stack: Stack, tls_redis: RedisServer
) -> None:
    # The port is open, but a client that does not speak TLS gets nowhere.
    plain = redis.Redis.from_url(f"redis://{LOOPBACK}:{tls_redis.port}/0", socket_timeout=5)
    try:
        with pytest.raises(redis.exceptions.ConnectionError) as failed:
            plain.ping()
    finally:
        plain.close()
    assert "refused" not in str(failed.value)
    assert tls_stack.env["ACTMAP_BROKER_URL"].startswith("rediss://")
    assert "ssl_cert_reqs=required&ssl_ca_certs=" in tls_stack.env["ACTMAP_RESULT_BACKEND"]

    cam = random_map(3)
    with tls_stack.producer() as producer:
        result = producer.collect([producer.submit("over/tls", cam)], timeout=60)[0]

    assert result.error is None
    assert result.checksum == "md5:" + hashlib.md5(render_png(cam), usedforsecurity=False).hexdigest()
    # (kombu prints an empty password as `:**@`.)
    assert re.search(rf"Connected to rediss://\S*{LOOPBACK}:{tls_redis.port}/0", tls_stack.worker_logs())


@pytest.mark.parametrize("trust", ["another CA", "the system trust store"])
def test_a_client_that_does_not_trust_the_servers_ca_is_refused_by_broker_and_result_backend(
    trust: str,
    tls_redis: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if trust == "another CA":
        other_ca, _ = make_ca(tmp_path / "other-ca", "some other CA")
        db = 10
        broker, backend = tls_redis.url(db, ca_certs=other_ca), tls_redis.url(db + 1, ca_certs=other_ca)
    else:
        db = 12
        broker = f"rediss://{LOOPBACK}:{tls_redis.port}/{db}?ssl_cert_reqs=required"
        backend = f"rediss://{LOOPBACK}:{tls_redis.port}/{db + 1}?ssl_cert_reqs=required"
    producer = Producer(
        Settings(
            home=tmp_path,
            broker_url=broker,
            result_backend=backend,
            background_publish=False,
            publish_timeout_s=1,
        )
    )
    try:
        with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
            producer.submit("untrusted", random_map(4))
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            producer.collect(["untrusted"], timeout=5)
    finally:
        producer.close()


def test_a_bare_rediss_url_verifies_the_server_against_the_system_trust_store(
    tls_redis: RedisServer, tls_files: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bare(db: int) -> str:
        return f"rediss://{LOOPBACK}:{tls_redis.port}/{db}"

    # Without the CA in the trust store: refused (kombu alone would connect without verifying, and
    # Celery's result backend would refuse a rediss:// URL without ssl_cert_reqs outright).
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    untrusting = Producer(
        Settings(
            home=tmp_path,
            broker_url=bare(6),
            result_backend=bare(7),
            background_publish=False,
            publish_timeout_s=1,
        )
    )
    try:
        with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.submit("bare", random_map(5))
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.collect(["bare"], timeout=5)
    finally:
        untrusting.close()

    # With the CA in the trust store (OpenSSL's SSL_CERT_FILE), the same bare URLs work end to end.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca_cert))
    stack = Stack(
        env={
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": bare(4),
            "ACTMAP_RESULT_BACKEND": bare(5),
            "ACTMAP_STORAGE_URL": f"file://{tmp_path / 'maps'}",
            "SSL_CERT_FILE": str(tls_files.ca_cert),
        },
        log_dir=tmp_path,
    )
    stack.start_worker(concurrency=1)
    try:
        with stack.producer() as producer:
            result = producer.collect([producer.submit("bare", random_map(5))], timeout=60)[0]
    finally:
        stack.stop()
    assert result.error is None
    assert result.locator == (tmp_path / "maps" / "bare.png").as_uri()


# -- 3. credentials never logged ------------------------------------------------------------------


def test_neither_the_redis_password_nor_the_aws_secret_appears_in_any_worker_or_cli_output(
    password_stack: tuple[Stack, str],
    password_redis: RedisServer,
    s3_server: SeaweedS3,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack, bucket = password_stack
    outputs: dict[str, str] = {}

    def run(
        label: str, *args: str, env: dict[str, str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = actmap(*args, env=env, cwd=tmp_path, stdin=stdin)
        outputs[f"{label} stdout"], outputs[f"{label} stderr"] = done.stdout, done.stderr
        return done

    maps = tmp_path / "maps"
    maps.mkdir()
    np.save(maps / "fine.npy", random_map(6, 32))

    # Success: submit and collect through the CLI; the worker stores to S3 signing with the secret.
    submitted = run("submit ok", "submit", str(maps), env=stack.env)
    assert submitted.returncode == 0, submitted.stderr
    collected = run("collect ok", "collect", env=stack.env, stdin=submitted.stdout)
    assert collected.returncode == 0, collected.stderr
    assert json.loads(collected.stdout)["locator"] == f"s3://{bucket}/maps/fine.png"

    # Failure on a worker: its bucket name is one S3 refuses (SeaweedFS creates missing buckets on
    # PUT, so a deleted bucket would not do), and the map's result is the refusal.
    failing = Stack(
        env={
            **stack.env,
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": password_redis.url(2),
            "ACTMAP_RESULT_BACKEND": password_redis.url(3),
            "ACTMAP_STORAGE_URL": "s3://ab/maps",
        },
        log_dir=tmp_path,
    )
    failing.start_worker(concurrency=1)
    try:
        submitted = run("submit doomed", "submit", str(maps), env=failing.env)
        assert submitted.returncode == 0, submitted.stderr
        collected = run("collect doomed", "collect", env=failing.env, stdin=submitted.stdout)
    finally:
        failing.stop()
    assert collected.returncode == 1
    assert json.loads(collected.stdout)["error"]["type"] == "StorageRejectedError"
    assert "1 of 1 maps failed" in collected.stderr

    # Failure on the producer side: nothing listens on the broker's port; the password is in the URL.
    unreachable_env = {
        **stack.env,
        "ACTMAP_BROKER_URL": closed_port_url(),
        "ACTMAP_PUBLISH_TIMEOUT_S": "1",
        "ACTMAP_FLUSH_TIMEOUT_S": "2",
    }
    unreachable = run("submit unreachable", "submit", str(maps), env=unreachable_env)
    assert unreachable.returncode != 0
    with caplog.at_level(logging.DEBUG):
        producer = Producer(
            Settings(
                home=tmp_path / "home",
                broker_url=closed_port_url(),
                result_backend=closed_port_url(1),
                background_publish=False,
                publish_timeout_s=1,
            )
        )
        try:
            with pytest.raises(BrokerError) as raised:
                producer.submit("unreachable", random_map(8, 8))
        finally:
            producer.close()
    outputs["BrokerError"] = f"{raised.value}\n{raised.value!r}\n{raised.value.__cause__!r}"
    outputs["this process's log records"] = caplog.text
    outputs["worker logs"] = stack.worker_logs() + failing.worker_logs()

    # The outputs say what happened, including where the broker is (password masked), so a leak would
    # have somewhere to show.
    assert "stored at s3://" in outputs["worker logs"]
    assert "InvalidBucketName" in outputs["worker logs"]
    assert f"redis://:**@{LOOPBACK}:{password_redis.port}/2" in outputs["worker logs"]
    assert "could not publish 1 map(s) to redis://:**@127.0.0.1:" in outputs["BrokerError"]
    assert "not taking messages" in outputs["submit unreachable stderr"]
    for secret in {PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), s3_server.secret_key}:
        leaks = [label for label, text in outputs.items() if secret in text]
        assert not leaks, f"a credential appears in: {leaks}"


# -- 4. S3 server-side encryption ------------------------------------------------------------------


def test_the_sse_setting_has_the_worker_store_maps_encrypted_at_rest_with_their_md5_as_etag(
    password_stack: tuple[Stack, str], s3_server: SeaweedS3
) -> None:
    stack, bucket = password_stack
    assert stack.env["ACTMAP_S3_SERVER_SIDE_ENCRYPTION"] == "AES256"
    cam = random_map(9, 128)
    with stack.producer() as producer:
        result = producer.collect([producer.submit("encrypted", cam)], timeout=60)[0]
    assert result.error is None

    client = s3_server.client()
    try:
        # A control object of the same kind, stored without SSE, to show the scan below finds plaintext.
        control_png = render_png(random_map(10, 128))
        client.put_object(Bucket=bucket, Key="control.png", Body=control_png, ContentType="image/png")
        head = client.head_object(Bucket=bucket, Key="maps/encrypted.png")
        control_head = client.head_object(Bucket=bucket, Key="control.png")
        body = client.get_object(Bucket=bucket, Key="maps/encrypted.png")["Body"].read()
    finally:
        client.close()

    png = render_png(cam)
    assert head.get("ServerSideEncryption") == "AES256"
    assert "ServerSideEncryption" not in control_head
    assert body == png  # decrypted on the way out
    assert result.checksum == f"md5:{head['ETag'].strip(chr(34))}" == f"md5:{hashlib.md5(png).hexdigest()}"

    # Each bucket is a SeaweedFS collection: its volumes are the files named <bucket>_<volume id>.*
    volumes = [p for p in (s3_server.dir / "data").rglob(f"{bucket}_*") if p.is_file()]
    assert volumes
    stored = b"".join(p.read_bytes() for p in volumes)
    middle = len(png) // 2
    assert control_png[middle : middle + 64] in stored
    assert png[middle : middle + 64] not in stored
