"""CPU per S3 PUT over TLS against plain HTTP, for each client: ``python -m benchmarks.s3_tls`` (about 30 s).

One private SeaweedFS serves S3 on both a plain HTTP port and an HTTPS port, its certificate signed by a
CA made for the run (given to the clients as AWS_CA_BUNDLE, as a deployment would). For each client
(boto3's ``S3Storage``, obstore's ``ObstoreS3Storage``) and each scheme, the same 224² PNGs are PUT one
after another; the figure is this process's CPU time (all its threads: obstore does its HTTP and TLS on
tokio threads, not the caller's) and the wall time, per PUT. The four cases run in turn, ``--rounds``
times, so that drift of the machine spreads over all of them. Connections are kept alive, as a worker's
are: the TLS handshake is paid once per connection, the encryption on every PUT. A fifth and sixth case,
boto3 with request_checksum_calculation=when_required, show what boto3's default costs over HTTPS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import gradcam_maps, machine, table
from producer.settings import Settings
from tests.support.ports import LOOPBACK
from tests.support.seaweedfs import SeaweedS3
from tests.support.tls import make_tls_files
from worker.render import render_png
from worker.storage import Storage, open_storage

CLIENTS = ("boto3", "obstore")
LEAN = "boto3, no CRC32"  # boto3 with request_checksum_calculation=when_required (Content-MD5 still sent)
SCHEMES = ("http", "https")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.s3_tls")
    parser.add_argument("--puts", type=int, default=500, help="PUTs per case and round (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the four cases (default 3)")
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    pngs = [render_png(cam) for cam in gradcam_maps(224, 16)]
    sizes = f"{min(map(len, pngs))}-{max(map(len, pngs))}"
    print(f"224² PNGs of {sizes} bytes, {args.puts} PUTs per case and round\n")
    with tempfile.TemporaryDirectory(prefix="actmap-s3-tls-") as tmp:
        tls = make_tls_files(Path(tmp) / "tls")
        with SeaweedS3(tls=tls) as server:
            os.environ.update({**server.env(), "AWS_CA_BUNDLE": str(tls.ca_cert)})
            bucket = server.create_bucket()
            endpoints = {"http": f"http://{LOOPBACK}:{server.ports['s3.port']}", "https": server.endpoint_url}
            stores = {
                (client, scheme): _storage(Path(tmp), bucket, client, endpoints[scheme])
                for client in CLIENTS
                for scheme in SCHEMES
            }
            # boto3 over HTTPS sends the body aws-chunked with a CRC32 trailer (request_checksum_calculation
            # when_supported), after which urllib3 finds the connection dropped: a handshake per PUT.
            # The same client with the checksum only when required keeps its connection.
            os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
            for scheme in SCHEMES:
                stores[(LEAN, scheme)] = _storage(Path(tmp), bucket, "boto3", endpoints[scheme])
            del os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"]
            samples: dict[tuple[str, str], list[tuple[float, float]]] = {case: [] for case in stores}
            for case, storage in stores.items():
                _puts(storage, pngs, 20, f"warm-{case[0]}-{case[1]}")  # connections open, code paths warm
            for round_ in range(args.rounds):
                for case, storage in stores.items():
                    samples[case].append(_puts(storage, pngs, args.puts, f"r{round_}-{case[0]}-{case[1]}"))
    print(table(["client", "scheme", "CPU ms/PUT", "wall ms/PUT", "CPU range over rounds"], _rows(samples)))
    print("\nCPU TLS adds per PUT (median https - median http):")
    for client in (*CLIENTS, LEAN):
        http, https = (_median_cpu(samples[(client, scheme)]) for scheme in SCHEMES)
        print(f"  {client}: {https - http:+.3f} ms ({https / http:.2f} times)")
    return 0


def _storage(home: Path, bucket: str, client: str, endpoint: str) -> Storage:
    settings = Settings(
        home=home / "home",
        storage_url=f"s3://{bucket}/maps",
        s3_endpoint_url=endpoint,
        s3_client=client,  # type: ignore[arg-type]
    )
    return open_storage(settings).storage


def _puts(storage: Storage, pngs: list[bytes], count: int, prefix: str) -> tuple[float, float]:
    """(CPU ms, wall ms) per PUT of ``count`` PUTs in turn."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for index in range(count):
        storage.put(f"maps/{prefix}/{index:06d}.png", pngs[index % len(pngs)])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu * 1000 / count, wall * 1000 / count


def _median_cpu(samples: list[tuple[float, float]]) -> float:
    return statistics.median(cpu for cpu, _ in samples)


def _rows(samples: dict[tuple[str, str], list[tuple[float, float]]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for (client, scheme), values in samples.items():
        cpus = [cpu for cpu, _ in values]
        wall = statistics.median(w for _, w in values)
        rows.append(
            [client, scheme, f"{_median_cpu(values):.3f}", f"{wall:.3f}", f"{min(cpus):.3f}-{max(cpus):.3f}"]
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
