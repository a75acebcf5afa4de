"""Benchmark artifacts in the cloud (issue 10 part 1): operator-only upload with a byte cap, a per-benchmark download
token that only its device may use, for a bounded time, and a blob that is deleted once the device has answered."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from sqlalchemy import update

from lepton_edge.cloud import db
from lepton_edge.cloud.artifacts import MemoryArtifactStore
from lepton_edge.cloud.benchmarks import MAX_BENCHMARK_BYTES, Benchmarks
from lepton_edge.cloud.errors import AuthError, ConflictError, InvalidRequestError, NotFoundError
from lepton_edge.protocol import BenchmarkCommand, BenchmarkResult

BLOB = b"candidate bytes " * 100


async def _chunks(data: bytes, step: int = 300):
    for i in range(0, len(data), step):
        yield data[i : i + step]


@pytest.fixture(params=["sqlite", "postgresql"])
def bench(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'cloud.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    engine = db.connect(url)
    now = time.time()
    with engine.begin() as conn:
        for dev, status in (("dev-1", "online"), ("dev-off", "offline")):
            conn.execute(db.devices.insert().values(device_id=dev, fleet="default", profile="x86-avx2", tags="{}", password_hash="x",
                                                    enrolled_at=now, status=status, status_ts=now, last_seen=now,
                                                    telemetry_interval_s=10.0))
    store, sent = MemoryArtifactStore(), []
    b = Benchmarks(engine, store, lambda fleet, device, msg: sent.append((fleet, device, msg)), "https://cloud.test")
    return engine, store, sent, b


def _create(b, device="dev-1", data=BLOB, **kw):
    args = dict(model="digits", candidate="int8-qdq", runs=20, threads=2, timeout_s=60.0)
    args.update(kw)
    return asyncio.run(b.create(device, _chunks(data), **args))


def _answer(engine, row, cmd_id, data, etype="benchmark_result", device="dev-1"):
    with engine.begin() as conn:
        conn.execute(db.events.insert().values(device_id=device, event_id=f"e-{time.monotonic_ns()}", ts=time.time(),
                                               received_at=time.time(), type=etype, cmd_id=cmd_id, detail="boom",
                                               data=json.dumps(data)))


def test_a_benchmark_sends_its_device_a_command_and_only_its_token_downloads_it(bench):
    engine, store, sent, b = bench
    row = _create(b)
    assert row["status"] == "requested" and row["size"] == len(BLOB) and row["result"] is None
    (fleet, device, cmd), = sent
    assert isinstance(cmd, BenchmarkCommand) and (fleet, device) == ("default", "dev-1")
    assert cmd.url == f"https://cloud.test/v1/benchmarks/{row['id']}/download" and (cmd.runs, cmd.threads) == (20, 2)
    key, size, sha = b.download(row["id"], cmd.token)
    assert size == len(BLOB) and sha == cmd.sha256 == row["sha256"] and b"".join(store.read_range(key, 0, size)) == BLOB
    with engine.connect() as conn:
        assert conn.execute(db.benchmarks.select()).first().token != cmd.token  # only its hash is stored
    for bad in ("", "guess", cmd.token + "x"):
        with pytest.raises(AuthError):
            b.download(row["id"], bad)
    with pytest.raises(AuthError):
        b.download("0" * 32, cmd.token)


def test_the_result_is_read_once_and_the_blob_deleted(bench):
    engine, store, sent, b = bench
    row = _create(b)
    cmd = sent[0][2]
    result = BenchmarkResult(benchmark_id=row["id"], ok=True, p50_ms=1.25, p95_ms=2.5, golden="passed", arch="x86_64")
    _answer(engine, row, cmd.cmd_id, result.model_dump(mode="json"))
    done = b.get(row["id"])
    assert done["status"] == "done" and done["result"]["p50_ms"] == 1.25 and done["finished_at"]
    with pytest.raises(NotFoundError):
        store.size(f"benchmark-{row['id']}.lepton")
    with pytest.raises(ConflictError):
        b.download(row["id"], cmd.token)  # its artifact is gone with the answer
    assert b.get(row["id"])["result"] == done["result"]


@pytest.mark.parametrize("data, etype, reason", [
    ({"benchmark_id": "f" * 32, "ok": True}, "benchmark_result", "another benchmark"),
    ({"benchmark_id": None, "ok": True, "p50_ms": -3}, "benchmark_result", "benchmark_result payload"),
    (["not", "an", "object"], "benchmark_result", "object"),
    ({}, "error", "boom"),
])
def test_a_hostile_or_failed_answer_fails_the_benchmark_with_a_reason(bench, data, etype, reason):
    engine, _, sent, b = bench
    row = _create(b)
    _answer(engine, row, sent[0][2].cmd_id, data, etype)
    got = b.get(row["id"])
    assert got["status"] == "failed" and reason in got["result"]["reason"], got


def test_another_devices_event_does_not_answer(bench):
    engine, _, sent, b = bench
    row = _create(b)
    _answer(engine, row, sent[0][2].cmd_id, {"benchmark_id": row["id"], "ok": True}, device="dev-off")
    assert b.get(row["id"])["status"] == "requested"


def test_unknown_offline_revoked_and_bad_requests_are_refused(bench):
    engine, _, sent, b = bench
    with pytest.raises(NotFoundError, match="not enrolled"):
        _create(b, "nope")
    with pytest.raises(ConflictError, match="offline.*cannot measure"):
        _create(b, "dev-off")
    for kw in ({"runs": 0}, {"runs": 10**6}, {"threads": -1}, {"timeout_s": 0}, {"timeout_s": 1e7}, {"candidate": "../x"},
               {"model": "a b"}):
        with pytest.raises(InvalidRequestError):
            _create(b, **kw)
    with pytest.raises(InvalidRequestError, match="empty"):
        _create(b, data=b"")
    row = _create(b)
    with engine.begin() as conn:
        conn.execute(update(db.devices).where(db.devices.c.device_id == "dev-1").values(revoked_at=time.time()))
    with pytest.raises(AuthError, match="revoked"):
        b.download(row["id"], sent[-1][2].token)
    with pytest.raises(ConflictError, match="revoked"):
        _create(b)


def test_an_upload_over_the_cap_is_refused_and_stores_nothing(bench, monkeypatch):
    import lepton_edge.cloud.benchmarks as mod

    _, store, sent, b = bench
    monkeypatch.setattr(mod, "MAX_BENCHMARK_BYTES", 1000)
    with pytest.raises(InvalidRequestError, match="at most 1000 bytes"):
        _create(b, data=b"x" * 1001)
    assert not store._blobs and not sent
    assert MAX_BENCHMARK_BYTES >= 64 << 20  # real candidates (a few MB to tens of MB) fit


def test_unanswered_benchmarks_expire_their_token_and_blob(bench):
    engine, store, sent, b = bench
    row = _create(b, timeout_s=1.0)
    token = sent[0][2].token
    with engine.begin() as conn:
        conn.execute(update(db.benchmarks).values(expires_at=time.time() - 1))
    with pytest.raises(AuthError, match="expired"):
        b.download(row["id"], token)
    assert b.sweep_expired() == 1
    assert b.get(row["id"])["status"] == "expired" and not store._blobs


def test_the_http_endpoints_need_the_operator_and_keep_tokens_out_of_urls(start_service):
    svc = start_service(broker_url=None)
    with httpx.Client(base_url=svc.url, timeout=10) as http:
        assert http.post("/v1/benchmarks", params={"device_id": "d", "model": "m", "candidate": "c"}, content=b"x").status_code == 401
        assert http.get("/v1/benchmarks/" + "0" * 32).status_code == 401
        assert http.get(f"/v1/benchmarks/{'0' * 32}/download", params={"token": "t"}).status_code == 401
        assert http.get(f"/v1/benchmarks/{'0' * 32}/download", headers={"Authorization": "Bearer t"}).status_code == 401
        op = {"Authorization": f"Bearer {svc.token}"}
        r = http.post("/v1/benchmarks", params={"device_id": "nope", "model": "m", "candidate": "c"}, content=b"x", headers=op)
        assert r.status_code == 404 and "not enrolled" in r.json()["error"]


def test_the_http_upload_is_capped_declared_or_streamed_and_larger_than_a_json_body(start_service, monkeypatch):
    import lepton_edge.cloud.benchmarks as mod

    svc = start_service(broker_url=None)
    monkeypatch.setattr(mod, "MAX_BENCHMARK_BYTES", 100_000)
    h = {"Authorization": f"Bearer {svc.token}", "Content-Type": "application/octet-stream"}
    q = {"device_id": "nope", "model": "m", "candidate": "c"}
    assert httpx.post(f"{svc.url}/v1/benchmarks", params=q, content=b"x" * 100_001, headers=h).status_code == 413
    from lepton_edge.cloud.client import CloudClient

    CloudClient(svc.url, svc.token).enroll("dev-1", "x86-avx2")
    with svc.engine.begin() as conn:  # as its state message would: online, just heard from
        conn.execute(update(db.devices).values(status="online", status_ts=time.time(), last_seen=time.time()))
    online = {**q, "device_id": "dev-1"}
    r = httpx.post(f"{svc.url}/v1/benchmarks", params=online, content=iter([b"x" * 60_000, b"x" * 60_000]), headers=h)
    assert r.status_code == 413 and "100000-byte limit" in r.json()["error"]
    # Past the 64 KiB JSON cap, inside the benchmark cap: it reaches the handler (which knows no such device).
    assert httpx.post(f"{svc.url}/v1/benchmarks", params=q, content=b"x" * 90_000, headers=h).status_code == 404


def test_migration_0010_matches_the_table_and_goes_down_and_up_again(tmp_path):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from pathlib import Path
    from sqlalchemy import inspect

    engine = db.connect(f"sqlite:///{tmp_path / 'cloud.db'}")
    with engine.connect() as conn:
        diff = [d for d in compare_metadata(MigrationContext.configure(conn), db.metadata)
                if "benchmarks" in repr(d)]
    assert diff == []
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).with_name("migrations")))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009")
    assert "benchmarks" not in inspect(engine).get_table_names()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert "benchmarks" in inspect(engine).get_table_names()
