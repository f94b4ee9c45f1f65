"""Smoke tests for the test infrastructure itself: the private Redis and SeaweedFS servers are real,
private, loopback-only, persistent where promised, and S3 authentication/integrity checks are on."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.support.ports import LOOPBACK, poll_until
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3

SYSTEM_REDIS_PORT = 6379


def _listening_tcp(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket owned by `pid` (IPv4 and IPv6), read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # fd closed while we were looking
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, is_v6 in (("tcp", False), ("tcp6", True)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = TCP_LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            # IPv4 addresses are little-endian hex; IPv6 ones are only compared, never expected.
            ip = "v6:" + hex_ip if is_v6 else ".".join(str(b) for b in reversed(bytes.fromhex(hex_ip)))
            found.add((ip, int(hex_port, 16)))
    return found


def _error_code(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


# -- Redis -----------------------------------------------------------------------------------------


def test_private_redis_answers_and_is_not_the_system_one(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.port != SYSTEM_REDIS_PORT
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.pid is not None
    assert _listening_tcp(redis_server.pid) == {(LOOPBACK, redis_server.port)}
    client = redis_server.client()
    try:
        assert client.ping()
        # The process answering is the one we started, not some other server on that port.
        assert client.info("server")["process_id"] == redis_server.pid
        client.set("smoke", b"1")
        assert client.get("smoke") == b"1"
    finally:
        client.close()


def test_redis_url_is_flushed_between_tests(redis_server: RedisServer, redis_url: str) -> None:
    # Runs after the test above, which left "smoke" behind.
    client = redis_server.client()
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


def test_aof_redis_keeps_acknowledged_writes_across_sigkill_and_graceful_restart() -> None:
    with RedisServer(appendonly=True) as server:
        port, directory = server.port, server.dir
        client = server.client()
        try:
            client.set("before-crash", b"a")
        finally:
            client.close()

        server.kill()  # SIGKILL: only appendfsync=always guarantees the write is on disk
        assert not server.running
        server.start()
        assert (server.port, server.dir) == (port, directory)
        client = server.client()
        try:
            assert client.get("before-crash") == b"a"
            client.set("before-stop", b"b")
        finally:
            client.close()

        server.stop()
        server.start()
        client = server.client()
        try:
            assert client.mget("before-crash", "before-stop") == [b"a", b"b"]
        finally:
            client.close()


def test_default_redis_is_not_persistent() -> None:
    # Guards the `--save ""` default: a restart must not resurrect data from an RDB snapshot.
    with RedisServer() as server:
        client = server.client()
        try:
            client.set("gone", b"x")
        finally:
            client.close()
        server.stop()
        server.start()
        client = server.client()
        try:
            assert client.dbsize() == 0
        finally:
            client.close()


# -- SeaweedFS S3 ----------------------------------------------------------------------------------


def test_seaweedfs_listens_only_on_its_chosen_loopback_ports(s3_server: SeaweedS3) -> None:
    pid = s3_server.pid
    assert pid is not None
    chosen = {(LOOPBACK, port) for port in s3_server.ports.values()}

    def all_open() -> bool:
        listening = _listening_tcp(pid)
        # Checked on every poll: never anything outside our loopback ports, even transiently.
        assert listening <= chosen, f"unexpected listeners: {listening - chosen}"
        return listening == chosen

    # The admin server comes up shortly after S3 answers, so wait (bounded) for the full set.
    poll_until(all_open, 60, "all weed ports to listen")


def test_s3_put_get_round_trip(s3_server: SeaweedS3, s3_bucket: str) -> None:
    body = os.urandom(100_000)
    client = s3_server.client()
    try:
        put = client.put_object(Bucket=s3_bucket, Key="dir/blob.png", Body=body, ContentType="image/png")
        assert put["ETag"].strip('"') == hashlib.md5(body).hexdigest()
        got = client.get_object(Bucket=s3_bucket, Key="dir/blob.png")
        assert got["Body"].read() == body
        assert got["ContentType"] == "image/png"
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert keys == ["dir/blob.png"]
    finally:
        client.close()


def test_s3_request_signed_with_wrong_secret_is_refused(s3_server: SeaweedS3, s3_bucket: str) -> None:
    client = s3_server.client(secret_key="not-the-secret", retries={"max_attempts": 1})
    try:
        with pytest.raises(ClientError) as excinfo:
            client.put_object(Bucket=s3_bucket, Key="forged", Body=b"x")
        assert _error_code(excinfo.value) == (403, "SignatureDoesNotMatch")
    finally:
        client.close()
    _assert_absent(s3_server, s3_bucket, "forged")


def test_s3_unsigned_request_is_refused(s3_server: SeaweedS3, s3_bucket: str) -> None:
    request = urllib.request.Request(f"{s3_server.endpoint_url}/{s3_bucket}/anon", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(request, timeout=30)
    with excinfo.value as response:
        assert response.code == 403
        assert b"<Code>AccessDenied</Code>" in response.read()
    _assert_absent(s3_server, s3_bucket, "anon")


def test_s3_put_with_wrong_content_md5_is_refused(s3_server: SeaweedS3, s3_bucket: str) -> None:
    wrong_md5 = base64.b64encode(hashlib.md5(b"other bytes").digest()).decode()
    client = s3_server.client(retries={"max_attempts": 1})
    try:
        with pytest.raises(ClientError) as excinfo:
            client.put_object(Bucket=s3_bucket, Key="bad-md5", Body=b"payload", ContentMD5=wrong_md5)
        assert _error_code(excinfo.value) == (400, "BadDigest")
    finally:
        client.close()
    _assert_absent(s3_server, s3_bucket, "bad-md5")


def test_s3_put_with_wrong_crc32_checksum_is_refused(s3_server: SeaweedS3, s3_bucket: str) -> None:
    wrong_crc = base64.b64encode(zlib.crc32(b"other bytes").to_bytes(4, "big")).decode()
    client = s3_server.client(retries={"max_attempts": 1})
    try:
        with pytest.raises(ClientError) as excinfo:
            client.put_object(Bucket=s3_bucket, Key="bad-crc", Body=b"payload", ChecksumCRC32=wrong_crc)
        assert _error_code(excinfo.value) == (400, "BadDigest")
    finally:
        client.close()
    _assert_absent(s3_server, s3_bucket, "bad-crc")


def test_s3_env_is_enough_for_a_subprocess(s3_server: SeaweedS3, s3_bucket: str) -> None:
    # Only env() (no PATH, HOME, ...): what a worker subprocess would get in an integration test.
    script = (
        "import boto3, sys\n"
        "s3 = boto3.client('s3')\n"
        "s3.put_object(Bucket=sys.argv[1], Key='from-subprocess', Body=b'hi')\n"
        "print(s3.get_object(Bucket=sys.argv[1], Key='from-subprocess')['Body'].read().decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, s3_bucket],
        env=s3_server.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hi"


def _assert_absent(s3_server: SeaweedS3, bucket: str, key: str) -> None:
    """The refused request must not have stored anything."""
    client = s3_server.client()
    try:
        with pytest.raises(ClientError) as excinfo:
            client.head_object(Bucket=bucket, Key=key)
        assert _error_code(excinfo.value)[0] == 404
    finally:
        client.close()
