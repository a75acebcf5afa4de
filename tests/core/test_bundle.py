"""The bundle contract: round trip, signature, and a reader that refuses hostile input."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lepton_edge.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ReadLimits,
    pack_bundle,
    read_bundle,
    sha256_arrays,
    write_bundle,
)
from lepton_edge.errors import BundleFormatError, BundleIntegrityError, SignatureError
from lepton_edge.signing import generate_keypair


def _fields(**over):
    base = dict(
        name="digits", version="1.0.0", profile="x86-avx2",
        runtime={"name": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "threads": 2},
        precision="fp32", model_file="model.onnx",
        inputs=[{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        source={"sha256": "0" * 64, "format": "onnx", "name": "digits.onnx"},
    )
    base.update(over)
    return base


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    p = tmp_path / "src.onnx"
    p.write_bytes(os.urandom(4096))
    return p


@pytest.fixture
def golden():
    rng = np.random.default_rng(0)
    return [rng.random((3, 1, 8, 8), dtype=np.float32)], [rng.random((3, 10), dtype=np.float32)], {"atol": 1e-3, "rtol": 1e-3}


@pytest.fixture
def signed(tmp_path: Path, model_file: Path, golden, keypair) -> Path:
    return write_bundle(tmp_path / "b", manifest_fields=_fields(), files={"model.onnx": model_file},
                        report={"winner": "fp32"}, golden=golden, sign_key=keypair[0])


def test_round_trip_signed_directory_and_archive(signed: Path, keypair, tmp_path: Path, golden):
    b = read_bundle(signed, trusted_keys=[keypair[1]])
    assert b.signature_checked and b.signed_by
    assert set(b.manifest.files) == {"model.onnx", "golden.npz", "report.json"}
    ins, outs = b.golden_vectors()
    np.testing.assert_array_equal(ins[0], golden[0][0])
    np.testing.assert_array_equal(outs[0], golden[1][0])
    archive = pack_bundle(signed)
    b2 = read_bundle(archive, trusted_keys=[keypair[1]], extract_dir=tmp_path / "x")
    assert b2.manifest == b.manifest


def test_real_model_bundle_replays_golden_vectors(digits_onnx: Path, digits, tmp_path: Path, keypair):
    from lepton_edge.runtimes import open_session

    _, data, _ = digits
    sess = open_session(digits_onnx, "onnxruntime", threads=1)
    x = data.x_test[:4]
    y = sess.run({"input": x})[0]
    out = write_bundle(tmp_path / "real", manifest_fields=_fields(calibration={"sha256": sha256_arrays([x]), "samples": 4}),
                       files={"model.onnx": digits_onnx}, golden=([x], [y], {"atol": 1e-4, "rtol": 1e-4, "top1_must_match": True}),
                       sign_key=keypair[0])
    b = read_bundle(pack_bundle(out), trusted_keys=[keypair[1]], extract_dir=tmp_path / "e")
    gi, go = b.golden_vectors()
    got = open_session(b.model_path, "onnxruntime", threads=1).run({"input": gi[0]})[0]
    np.testing.assert_allclose(got, go[0], atol=b.manifest.golden.atol, rtol=b.manifest.golden.rtol)


def test_unsigned_bundle_is_refused_unless_allowed(tmp_path: Path, model_file: Path):
    out = write_bundle(tmp_path / "u", manifest_fields=_fields(), files={"model.onnx": model_file})
    with pytest.raises(SignatureError, match="unsigned"):
        read_bundle(out)
    b = read_bundle(out, allow_unsigned=True)
    assert b.signed_by is None and not b.signature_checked


def test_untrusted_key_and_tampered_manifest(signed: Path, tmp_path: Path, keypair):
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="not trusted"):
        read_bundle(signed, trusted_keys=[other_pub])
    m = json.loads((signed / MANIFEST_NAME).read_text())
    m["version"] = "9.9.9"
    (signed / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(signed, trusted_keys=[keypair[1]])


def test_tampered_file_fails_its_hash(signed: Path, keypair):
    data = bytearray((signed / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (signed / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256"):
        read_bundle(signed, trusted_keys=[keypair[1]])


def test_missing_and_extra_files(signed: Path, keypair):
    (signed / "evil.sh").write_text("rm -rf /")
    with pytest.raises(BundleIntegrityError, match="does not list: evil.sh"):
        read_bundle(signed, trusted_keys=[keypair[1]])
    (signed / "evil.sh").unlink()
    (signed / "golden.npz").unlink()
    with pytest.raises(BundleIntegrityError, match="missing files: golden.npz"):
        read_bundle(signed, trusted_keys=[keypair[1]])


def test_symlink_member_refused(signed: Path, keypair):
    (signed / "model.onnx").unlink()
    (signed / "model.onnx").symlink_to("/etc/passwd")
    with pytest.raises(BundleFormatError, match="symlink"):
        read_bundle(signed, trusted_keys=[keypair[1]])


def test_symlinked_bundle_path_refused(signed: Path, tmp_path: Path, keypair):
    link = tmp_path / "link"
    link.symlink_to(signed)
    with pytest.raises(BundleFormatError, match="symlink"):
        read_bundle(link, trusted_keys=[keypair[1]])


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    i = tarfile.TarInfo(name)
    i.size = len(data)
    return i, data


@pytest.mark.parametrize(
    "members, match",
    [
        ([_reg("../escape.txt", b"x")], "traversal"),
        ([_reg("/etc/cron.d/x", b"x")], "relative"),
        ([_reg("a/../../x", b"x")], "traversal"),
        ([_reg("C:\\win.txt", b"x")], "relative"),
        ([_reg("ok.txt", b"x"), _reg("ok.txt", b"y")], "twice"),
    ],
)
def test_hostile_archive_members(tmp_path: Path, members, match):
    arc = tmp_path / "bad.lepton"
    arc.write_bytes(_tar(members))
    with pytest.raises(BundleFormatError, match=match):
        read_bundle(arc, allow_unsigned=True, extract_dir=tmp_path / "x")
    assert not (tmp_path / "escape.txt").exists()


def test_archive_links_and_devices_refused(tmp_path: Path):
    sym = tarfile.TarInfo("model.onnx")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("h")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    fifo = tarfile.TarInfo("f")
    fifo.type = tarfile.FIFOTYPE
    for info, kind in ((sym, "symlink"), (hard, "hard link"), (fifo, "special")):
        arc = tmp_path / f"{kind}.lepton"
        arc.write_bytes(_tar([(info, None)]))
        with pytest.raises(BundleFormatError, match=kind):
            read_bundle(arc, allow_unsigned=True, extract_dir=tmp_path / kind)


def test_oversized_member_and_too_many_files(tmp_path: Path):
    arc = tmp_path / "big.lepton"
    arc.write_bytes(_tar([_reg("model.onnx", b"\0" * 5000)]))
    with pytest.raises(BundleFormatError, match="limit"):
        read_bundle(arc, allow_unsigned=True, extract_dir=tmp_path / "x", limits=ReadLimits(max_file_bytes=1000))
    many = tmp_path / "many.lepton"
    many.write_bytes(_tar([_reg(f"f{i}", b"x") for i in range(10)]))
    with pytest.raises(BundleFormatError, match="more than 5 files"):
        read_bundle(many, allow_unsigned=True, extract_dir=tmp_path / "y", limits=ReadLimits(max_files=5))


def test_decompression_bomb_stops_early(tmp_path: Path):
    # 8 MiB of zeros in one member compresses to ~8 KiB; the declared size trips the cap.
    info = tarfile.TarInfo("model.onnx")
    info.size = 8 << 20
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        t.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = tmp_path / "bomb.lepton"
    bomb.write_bytes(gzip.compress(raw.getvalue()))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleFormatError, match="over 1048576 bytes"):
        read_bundle(bomb, allow_unsigned=True, extract_dir=tmp_path / "x",
                    limits=ReadLimits(max_file_bytes=1 << 30, max_total_bytes=1 << 20))


def test_pax_header_bomb_trips_the_fuse(tmp_path: Path):
    # A PAX header is read into memory whole by tarfile; only the byte fuse stops a huge one.
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 8 << 20
    raw = io.BytesIO()
    raw.write(pax.tobuf(format=tarfile.USTAR_FORMAT))
    raw.write(b"0" * pax.size)
    bomb = tmp_path / "pax.lepton"
    bomb.write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(BundleFormatError, match="bomb"):
        read_bundle(bomb, allow_unsigned=True, extract_dir=tmp_path / "x",
                    limits=ReadLimits(max_files=4, max_total_bytes=1 << 20))


@pytest.mark.parametrize("blob", [b"", b"not a tarball at all", b"\x1f\x8b\x08\x00garbage", os.urandom(2048)])
def test_garbage_archive(tmp_path: Path, blob: bytes):
    arc = tmp_path / "g.lepton"
    arc.write_bytes(blob)
    with pytest.raises(BundleFormatError):
        read_bundle(arc, allow_unsigned=True, extract_dir=tmp_path / "x")


@pytest.mark.parametrize(
    "manifest, match",
    [
        (b"\xff\xfe", "UTF-8"),
        (b"{", "not valid JSON"),
        (b"[]", "object"),
        (b'{"schema_version": 2}', "not supported"),
        (b'{"schema_version": 1, "schema_version": 1}', "duplicate"),
        (b'{"schema_version": 1, "x": NaN}', "NaN"),
        (b'{"schema_version": 1}', "Field required"),
        (b"[" * 100000 + b"]" * 100000, "JSON|object"),
    ],
)
def test_hostile_manifest(tmp_path: Path, manifest: bytes, match: str):
    d = tmp_path / "b"
    d.mkdir()
    (d / MANIFEST_NAME).write_bytes(manifest)
    with pytest.raises(BundleFormatError, match=match):
        read_bundle(d, allow_unsigned=True)


def test_manifest_path_traversal_in_files(tmp_path: Path, model_file: Path):
    out = write_bundle(tmp_path / "b", manifest_fields=_fields(), files={"model.onnx": model_file})
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["files"]["../../etc/passwd"] = m["files"]["model.onnx"]
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises((BundleFormatError, BundleIntegrityError)):
        read_bundle(out, allow_unsigned=True)


def test_hostile_signature_file(signed: Path, keypair):
    for blob, match in ((b"nope", "JSON"), (b'{"algorithm":"rsa"}', "unsupported"),
                        (json.dumps({"algorithm": "ed25519", "key_id": "x", "signature": "!!"}).encode(), "base64")):
        (signed / SIGNATURE_NAME).write_bytes(blob)
        with pytest.raises(SignatureError, match=match):
            read_bundle(signed, trusted_keys=[keypair[1]])


def test_golden_vectors_checked_against_signature(tmp_path: Path, model_file: Path):
    bad = ([np.zeros((2, 1, 8, 8), np.float64)], [np.zeros((2, 10), np.float32)], {"atol": 0.1, "rtol": 0.1})
    out = write_bundle(tmp_path / "b", manifest_fields=_fields(), files={"model.onnx": model_file}, golden=bad)
    with pytest.raises(BundleFormatError, match="float64"):
        read_bundle(out, allow_unsigned=True).golden_vectors()


def test_writer_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path: Path, model_file: Path):
    out = write_bundle(tmp_path / "b", manifest_fields=_fields(), files={"model.onnx": model_file})
    from lepton_edge.errors import BundleError

    with pytest.raises(BundleError, match="exists"):
        write_bundle(out, manifest_fields=_fields(), files={"model.onnx": model_file})
    with pytest.raises(Exception):
        write_bundle(tmp_path / "c", manifest_fields=_fields(precision="int4"), files={"model.onnx": model_file})
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp")]


def test_pack_is_reproducible_and_refuses_silent_overwrite(signed: Path, tmp_path: Path):
    from lepton_edge.errors import BundleError

    a = pack_bundle(signed, tmp_path / "a.lepton")
    b = pack_bundle(signed, tmp_path / "b.lepton")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(BundleError, match="exists"):
        pack_bundle(signed, a, overwrite=False)


def test_archive_members_after_the_manifest_are_checked_from_their_headers(signed: Path, tmp_path: Path, keypair):
    """A stray or inflated member is refused before a byte of it is written (no 2 GiB of zeros on an SD card)."""
    packed = pack_bundle(signed, tmp_path / "good.lepton")
    with tarfile.open(packed) as t:
        names = t.getnames()
        real = [(t.getmember(n), t.extractfile(n).read()) for n in names]
    assert names[0] == "manifest.json"  # pack_bundle writes it first
    stray = tarfile.TarInfo("zeros.bin")
    stray.size = 1 << 30  # declared, never sent: refusing from the header must not need the bytes
    arc = tmp_path / "stray.lepton"
    arc.write_bytes(_tar(real[:1] + [(stray, None)]))
    written = tmp_path / "x"
    with pytest.raises(BundleIntegrityError, match="does not list: zeros.bin"):
        read_bundle(arc, trusted_keys=[keypair[1]], extract_dir=written)
    assert not (written / "zeros.bin").exists()
    inflated = tarfile.TarInfo("model.onnx")
    inflated.size = 1 << 30
    arc.write_bytes(_tar(real[:1] + [(inflated, None)]))
    with pytest.raises(BundleIntegrityError, match="model.onnx is 1073741824 bytes; the manifest says"):
        read_bundle(arc, trusted_keys=[keypair[1]], extract_dir=tmp_path / "y")
