"""Fast checks of the pieces: lease election, the artifact-store seam, option parsing, migrations."""

from __future__ import annotations

import time

import pytest

from lepton_edge.cloud import db
from lepton_edge.cloud.artifacts import LocalArtifactStore, MemoryArtifactStore, open_store
from lepton_edge.cloud.errors import CloudConfigError, DatabaseError, InvalidRequestError, NotFoundError, StoreError
from lepton_edge.cloud.leader import Lease
from lepton_edge.cloud.rollout import _wave_sizes, parse_duration, parse_fraction, parse_waves


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_only_one_lease_holder_and_handover_after_expiry(backend, tmp_path, request):
    url = str(tmp_path / "x.db") if backend == "sqlite" else request.getfixturevalue("pg_database")
    engine = db.connect(url)
    db.connect(url)  # migrating an up-to-date database again is a no-op
    a, b = Lease(engine, "rollouts", "a", ttl_s=0.5), Lease(engine, "rollouts", "b", ttl_s=0.5)
    assert a.acquire() and not b.acquire() and a.acquire()
    assert b.current_holder() == "a"
    time.sleep(0.6)  # a stops renewing: it died
    assert b.acquire() and not a.acquire() and not a.held
    b.release()
    assert a.acquire()
    engine.dispose()


@pytest.fixture
def s3_mock(monkeypatch):
    """moto's in-process S3: real boto3 calls, no network."""
    from moto import mock_aws

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="lepton-test")
        yield "s3://lepton-test/bundles"


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_artifact_stores_keep_one_contract(kind, tmp_path, request):
    store = {"local": lambda: LocalArtifactStore(tmp_path / "store"), "memory": MemoryArtifactStore,
             "s3": lambda: open_store(request.getfixturevalue("s3_mock"))}[kind]()
    src = tmp_path / "blob"
    data = bytes(range(256)) * 3000
    src.write_bytes(data)
    assert store.put("abc.lepton", src) == len(data)
    assert store.size("abc.lepton") == len(data)
    assert b"".join(store.read_range("abc.lepton", 0, len(data))) == data
    assert b"".join(store.read_range("abc.lepton", 1000, 300_000)) == data[1000:300_000]
    with pytest.raises(NotFoundError):
        store.size("missing.lepton")
    for key in ("../etc/passwd", "a/b", "", "UPPER", "x" * 300):
        with pytest.raises(StoreError):
            store.put(key, src)


def test_option_parsing():
    assert parse_duration("500ms") == 0.5 and parse_duration("10m") == 600 and parse_duration("90") == 90
    assert parse_fraction("1%") == 0.01 and parse_fraction("0.2") == 0.2
    assert parse_waves("5%,25%,100%") == [5, 25, 100]
    for bad in ("", "x", "-1s", "1y", "nan"):
        with pytest.raises(InvalidRequestError):
            parse_duration(bad)
    for bad in ("50%,20%,100%", "5%,25%", "0%,100%", "a,b", "5%,5%,100%"):
        with pytest.raises(InvalidRequestError):
            parse_waves(bad)
    assert _wave_sizes(3, [5, 25, 100]) == [1, 3]  # a wave that adds nobody is merged away
    assert _wave_sizes(100, [5, 25, 100]) == [5, 25, 100]
    assert _wave_sizes(1, [50, 100]) == [1]


def test_bad_database_and_store_options_are_one_clear_error(tmp_path):
    with pytest.raises(CloudConfigError, match="unsupported database URL"):
        db.connect("mysql://root@localhost/x")
    with pytest.raises(DatabaseError, match="cannot open database"):
        db.connect("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(CloudConfigError, match="names no bucket"):
        open_store("s3://")
    assert isinstance(open_store("memory:"), MemoryArtifactStore)


def test_service_serves_ranged_downloads_from_s3(s3_mock, start_service, private_broker, cloud_bundles):
    import httpx

    svc = start_service(broker_url=private_broker.url, artifacts=s3_mock)
    archive = cloud_bundles("1")
    data = archive.read_bytes()
    h = {"Authorization": f"Bearer {svc.token}"}
    b = httpx.post(f"{svc.url}/v1/models", content=data, headers=h).json()
    url = f"{svc.url}/v1/bundles/{b['id']}/download"
    assert httpx.get(url, headers=h).content == data
    part = httpx.get(url, headers={**h, "Range": "bytes=10-"})
    assert part.status_code == 206 and part.content == data[10:]
