"""Writing a bundle directory and packing it into one archive file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import BundleError
from ..signing import load_private_key, sign
from ._paths import check_member_name
from .manifest import (
    GOLDEN_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Golden,
    Manifest,
    canonical_json,
    now_iso,
)

ARCHIVE_SUFFIX = ".lepton"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_arrays(arrays: Sequence[np.ndarray]) -> str:
    """A stable digest of a data set (dtype, shape and bytes of each array)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_golden(path: Path, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
    """Golden vectors as ``in_<i>`` / ``out_<j>`` arrays, in manifest order; samples on axis 0."""
    arrays = {f"in_{i}": np.asarray(a) for i, a in enumerate(inputs)}
    arrays.update({f"out_{j}": np.asarray(a) for j, a in enumerate(outputs)})
    counts = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(counts) != 1 or -1 in counts:
        raise BundleError(f"golden vectors need the same sample count on axis 0 for every tensor, got {sorted(counts)}")
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_bundle(
    out_dir: Path | str,
    *,
    manifest_fields: Mapping[str, Any],
    files: Mapping[str, Path | str],
    report: Mapping[str, Any] | None = None,
    golden: tuple[Sequence[np.ndarray], Sequence[np.ndarray], Mapping[str, Any]] | None = None,
    sign_key: Path | str | None = None,
    overwrite: bool = False,
    reference_inputs: Any = None,
) -> Path:
    """Write a bundle directory at ``out_dir`` and return its path.

    ``files`` maps member names to source files (the model file, external weights, ...).
    ``golden`` is ``(inputs, outputs, tolerances)``, tolerances holding atol, rtol and
    optionally min_cosine and top1_must_match. ``reference_inputs`` (the calibration arrays, one
    per input, or a mapping by input name) adds the drift reference statistics of
    :mod:`lepton_edge.drift` as a signed member. Hashes, sizes, toolkit version and time are
    filled in here, so callers cannot get them wrong. The bundle is written next to its
    final place and renamed into it, so a crash never leaves half a bundle under that name.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists", hint="choose another -o directory or remove it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries: dict[str, FileEntry] = {}
        for name, src in files.items():
            check_member_name(name)
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        fields = dict(manifest_fields)
        if golden is not None:
            g_in, g_out, tol = golden
            write_golden(tmp / GOLDEN_NAME, g_in, g_out)
            fields["golden"] = Golden(file=GOLDEN_NAME, count=int(np.asarray(g_in[0]).shape[0]), **dict(tol))
        if reference_inputs is not None:
            from ..drift import REFERENCE_NAME, write_reference

            write_reference(tmp / REFERENCE_NAME, reference_inputs, [t["name"] if isinstance(t, Mapping) else t.name
                                                                      for t in fields.get("inputs", [])])
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True, default=_json_default))
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                entries[rel] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        fields["files"] = entries
        fields.setdefault("toolkit_version", __version__)
        fields.setdefault("created_at", now_iso())
        manifest = Manifest.model_validate(fields)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True))
        if sign_key is not None:
            sig = sign(manifest.canonical_bytes(), load_private_key(sign_key))
            (tmp / SIGNATURE_NAME).write_text(json.dumps(sig.to_json(), indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pack_bundle(bundle_dir: Path | str, archive: Path | str | None = None, *, overwrite: bool = True) -> Path:
    """Pack a bundle directory into one gzip'd tar (``.lepton``): regular files only.

    Member order, modes, times and the gzip header are fixed, so the same bundle always
    packs to the same bytes (and the same sha256) and a re-push is recognised as a re-push.
    """
    src = Path(bundle_dir)
    dest = Path(archive) if archive else src.with_name(src.name + ARCHIVE_SUFFIX)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists", hint="pass --force to replace it, or -o another path")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    # The manifest first: a reader can then refuse a member it does not list from its header.
    members = sorted((p for p in src.rglob("*") if p.is_file()),
                     key=lambda p: (p.relative_to(src).as_posix() != MANIFEST_NAME, p.relative_to(src).as_posix()))
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for p in members:
                    info = tarfile.TarInfo(p.relative_to(src).as_posix())
                    info.size = p.stat().st_size
                    info.mode = 0o644
                    info.mtime = 0
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
