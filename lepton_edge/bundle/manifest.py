"""The bundle manifest: a versioned schema, and its canonical bytes (what gets signed)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import BundleFormatError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
REPORT_NAME = "report.json"
GOLDEN_NAME = "golden.npz"

_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Strict):
    """How raw data becomes the model's input; the agent does not apply it, clients read it."""

    layout: str = Field(default="", description="e.g. NCHW, NHWC, NC")
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    description: str = ""


class TensorSpec(_Strict):
    name: str = Field(min_length=1, max_length=256)
    dtype: Literal[_DTYPES]  # type: ignore[valid-type]
    shape: list[int | None] = Field(max_length=8, description="None marks a dynamic axis (the batch).")
    preprocessing: Preprocessing | None = None

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int | None]) -> list[int | None]:
        if any(d is not None and not (0 < d <= 1 << 24) for d in v):
            raise ValueError(f"shape dims must be positive or null, got {v}")
        return v


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class RuntimeSpec(_Strict):
    name: Literal["onnxruntime", "tflite"]
    execution_providers: list[str] = Field(default_factory=list)
    threads: int = Field(default=1, ge=1, le=512)


class Golden(_Strict):
    """Test vectors the device replays before it activates the model."""

    file: str = GOLDEN_NAME
    count: int = Field(ge=1, le=1024)
    atol: float = Field(ge=0.0)
    rtol: float = Field(ge=0.0)
    min_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)
    top1_must_match: bool = Field(default=False, description="For classifiers: argmax of each output row must match.")


class SourceInfo(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: str = Field(max_length=64)
    name: str = Field(default="", max_length=256)


class CalibrationInfo(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    samples: int = Field(ge=0)
    synthetic: bool = False


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
    profile: str = Field(min_length=1, max_length=64)
    runtime: RuntimeSpec
    precision: Literal["fp32", "fp16", "int8", "int8-dynamic"]
    model_file: str
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    files: dict[str, FileEntry] = Field(min_length=1, max_length=64)
    golden: Golden | None = None
    source: SourceInfo
    calibration: CalibrationInfo | None = None
    task: Literal["classification", "regression", "embedding", "other"] = "classification"
    toolkit_version: str
    created_at: str
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("created_at")
    @classmethod
    def _iso(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"created_at must be ISO 8601, got {v!r}") from None
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if self.model_file not in self.files:
            raise BundleFormatError(f"manifest model_file {self.model_file!r} is not listed in files")
        if self.golden is not None and self.golden.file not in self.files:
            raise BundleFormatError(f"manifest golden file {self.golden.file!r} is not listed in files")
        for reserved in (MANIFEST_NAME, SIGNATURE_NAME):
            if reserved in self.files:
                raise BundleFormatError(f"manifest files must not list {reserved}")

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def bundle_id(self) -> str:
        return f"{self.name}-{self.version}-{self.profile}"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same object always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BundleFormatError(f"manifest has duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise BundleFormatError(f"manifest contains {name}, which JSON does not allow")


def parse_manifest(raw: bytes) -> Manifest:
    """Parse untrusted manifest bytes; every failure is a :class:`BundleFormatError`."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BundleFormatError("manifest.json is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise BundleFormatError(f"manifest.json is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BundleFormatError("manifest.json must be a JSON object")
    sv = data.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise BundleFormatError(
            f"manifest schema_version {sv!r} is not supported (this toolkit reads {SCHEMA_VERSION})",
            hint="upgrade lepton-edge on this device" if isinstance(sv, int) and sv > SCHEMA_VERSION else None,
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BundleFormatError(f"manifest.json: {loc}: {first['msg']}") from None
