"""CLI for the shared core: ``profiles``, ``keys`` and ``bundle``."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from .console import fail_line, out, print_table, warn
from .errors import ProfileError
from .profiles import ProfileRegistry, validate_profile_file

profiles_dir_option = click.option(
    "--profiles-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Extra directory of profile YAML files (also: LEPTON_EDGE_PROFILES).",
)


@click.group()
def profiles() -> None:
    """Device profiles: what a device is and how to convert for it."""


@profiles.command("list")
@profiles_dir_option
def profiles_list(profiles_dir: Path | None) -> None:
    """Table of every device profile."""
    reg = ProfileRegistry([profiles_dir] if profiles_dir else None)
    rows = []
    for p in reg.devices():
        acc = "none" if p.accelerator.kind == "none" else (p.accelerator.name or p.accelerator.kind)
        rt = p.runtime.name + (f" ({'>'.join(e.replace('ExecutionProvider', '') for e in p.runtime.execution_providers)})" if p.runtime.name == "onnxruntime" else f" ({'+'.join(p.runtime.delegates) or 'cpu'})")
        rows.append((p.id, ", ".join(p.aliases), p.device, p.arch, acc, rt, p.precision.default))
    print_table("device profiles", ["id", "aliases", "device", "arch", "accelerator", "runtime", "default precision"], rows)
    for path, why in reg.broken.items():
        warn(f"skipped {path}: {why}")


@profiles.command("show")
@click.argument("profile_id")
@profiles_dir_option
def profiles_show(profile_id: str, profiles_dir: Path | None) -> None:
    """Show one resolved profile (extends: applied) as YAML."""
    reg = ProfileRegistry([profiles_dir] if profiles_dir else None)
    prof = reg.get(profile_id)
    out.print(f"# {prof.id}: {prof.device}  ({reg.source_of(prof.id)})")
    out.print(yaml.safe_dump(prof.model_dump(mode="json"), sort_keys=False).rstrip())
    out.print(f"# {prof.describe_host_match()}")


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@profiles_dir_option
def profiles_validate(files: tuple[Path, ...], profiles_dir: Path | None) -> None:
    """Validate profile YAML files together (one may extend another); a line for each, non-zero exit if any is bad."""
    bad = 0
    for f in files:
        try:
            prof = validate_profile_file(f, alongside=[p for p in files if p != f], profiles_dir=profiles_dir)
        except ProfileError as e:
            bad += 1
            fail_line(f"{f}: {e.message}" if str(f) not in e.message else e.message, e.hint)
            continue
        out.print(f"ok  {f}: {prof.id} ({prof.device})")
    if bad:
        raise SystemExit(2)  # the exit code of every other CLI error


@click.group()
def keys() -> None:
    """Signing keys for bundles."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("keys"), show_default=True)
@click.option("--name", default="lepton", show_default=True, help="Writes NAME.key and NAME.pub.")
@click.option("--force", is_flag=True, help="Replace existing keys.")
def keys_generate(out_dir: Path, name: str, force: bool) -> None:
    """Generate an Ed25519 key pair for signing bundles."""
    from .signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(out_dir, name, overwrite=force)
    out.print(f"private key: {priv} (keep it secret; mode 0600)")
    out.print(f"public key:  {pub} (give it to devices as a trusted key)")
    out.print(f"key id:      {key_id(load_public_key(pub))}")


@click.group()
def bundle() -> None:
    """Inspect, verify and pack bundles."""


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@bundle.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and report as JSON.")
def bundle_inspect(path: Path, as_json: bool) -> None:
    """Show a bundle's manifest, files and conversion report (hashes checked, signature not)."""
    from .bundle import REPORT_NAME, read_bundle

    b = read_bundle(path, allow_unsigned=True)
    m = b.manifest
    report = json.loads((b.root / REPORT_NAME).read_text()) if REPORT_NAME in m.files else None
    if as_json:
        out.print_json(data={"manifest": m.model_dump(mode="json"), "report": report, "signed_by": b.signed_by})
        return
    sig = f"signed by key {b.signed_by} (run `bundle verify --pub` to check it)" if b.signed_by else "UNSIGNED: agents refuse it unless configured to accept unsigned bundles"
    rows = [
        ("name", m.name), ("version", m.version), ("profile", m.profile),
        ("runtime", f"{m.runtime.name} [{', '.join(m.runtime.execution_providers)}] threads={m.runtime.threads}"),
        ("precision", m.precision), ("task", m.task), ("signature", sig),
        ("source", f"{m.source.format} {m.source.name} sha256:{m.source.sha256[:16]}…"),
        ("calibration", f"{m.calibration.samples} samples{' (SYNTHETIC)' if m.calibration.synthetic else ''} sha256:{m.calibration.sha256[:16]}…" if m.calibration else "none"),
        ("golden vectors", f"{m.golden.count} (atol={m.golden.atol:g}, rtol={m.golden.rtol:g}, min cosine={m.golden.min_cosine:g})" if m.golden else "none"),
        ("toolkit", f"lepton-edge {m.toolkit_version}, {m.created_at}"),
    ]
    print_table(f"bundle {m.bundle_id}", ["field", "value"], rows)
    print_table("signature (inputs/outputs)", ["io", "name", "dtype", "shape"],
                [("in", t.name, t.dtype, t.shape) for t in m.inputs] + [("out", t.name, t.dtype, t.shape) for t in m.outputs])
    print_table("files", ["file", "size", "sha256"], [(n, _fmt_size(e.size), e.sha256[:16] + "…") for n, e in sorted(m.files.items())])
    if report and isinstance(report.get("candidates"), list):
        from .report_view import print_report

        print_report(report)


@bundle.command("verify")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--pub", "pubs", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="Trusted public key (repeatable).")
@click.option("--allow-unsigned", is_flag=True, help="Accept a bundle without a signature.")
def bundle_verify(path: Path, pubs: tuple[Path, ...], allow_unsigned: bool) -> None:
    """Check every hash and the signature; exits non-zero if anything is off."""
    from .bundle import read_bundle
    from .errors import SignatureError

    if not pubs and not allow_unsigned:
        raise SignatureError("no trusted key given", hint="pass --pub keys/lepton.pub (or --allow-unsigned)")
    b = read_bundle(path, trusted_keys=list(pubs), allow_unsigned=allow_unsigned)
    how = f"signature by key {b.signed_by} verified" if b.signature_checked else "UNSIGNED (accepted by --allow-unsigned)"
    out.print(f"ok  {b.manifest.bundle_id}: {len(b.manifest.files)} files match their hashes; {how}")


@bundle.command("pack")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--force", is_flag=True, help="Replace an existing archive.")
def bundle_pack(path: Path, output: Path | None, force: bool) -> None:
    """Pack a bundle directory into one .lepton archive (after checking it); the same bundle packs to the same bytes."""
    from .bundle import pack_bundle, read_bundle

    read_bundle(path, allow_unsigned=True)
    dest = pack_bundle(path, output, overwrite=force)
    out.print(f"wrote {dest} ({_fmt_size(dest.stat().st_size)})")
