"""Device profiles: the one vocabulary the converters, the agent and the cloud share.

A profile is a YAML file validated against :class:`DeviceProfile`. Profiles may
``extends:`` another profile (deep merge, child wins) and declare ``aliases`` (``jetson``
names the default Jetson). Built-in profiles ship in ``device_profiles/``; a user adds
their own in a directory named by ``--profiles-dir`` or ``LEPTON_EDGE_PROFILES``
(``os.pathsep``-separated), and those win over built-ins with the same id.

Public API: :class:`DeviceProfile`, :func:`load_profile`, :func:`list_profiles`,
:func:`validate_profile_file`, :class:`ProfileRegistry`.
"""

from __future__ import annotations

import os
import platform
from importlib import resources
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ProfileError
from .safe_yaml import describe_validation_error, read_yaml_mapping

__all__ = [
    "DeviceProfile",
    "ProfileRegistry",
    "load_profile",
    "list_profiles",
    "validate_profile_file",
    "host_matches",
    "normalize_arch",
    "feature_names",
    "platform_mismatch",
    "MAX_PROFILE_BYTES",
]

# A profile is a page of YAML; anything bigger is a mistake or an attack (billion laughs).
MAX_PROFILE_BYTES = 64 * 1024
_MAX_EXTENDS_DEPTH = 8

Precision = Literal["fp32", "fp16", "int8", "int8-dynamic"]
ExecutionProvider = Literal[
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    cores: int = Field(ge=1, le=512, description="Physical cores the runtime may use.")
    threads: int = Field(ge=1, le=512, description="Intra-op threads for inference and latency measurement.")
    features: list[str] = Field(default_factory=list, description=(
        "ISA features the profile's settings count on, e.g. avx2, avx512_vnni, dotprod, neon: a device "
        "that reports lacking one gets a warning at deploy time and from its agent at start-up."))
    model: str = Field(default="", description="CPU model, for people.")

    @model_validator(mode="after")
    def _threads_fit(self) -> "Cpu":
        if self.threads > self.cores:
            raise ValueError(f"threads ({self.threads}) exceeds cores ({self.cores})")
        return self


class Accelerator(_Strict):
    kind: Literal["none", "cuda", "npu", "tpu"] = "none"
    name: str = ""
    compute_capability: str | None = None
    fp16: bool = False
    int8: bool = Field(default=False, description="True where the accelerator runs INT8 faster than FP16 (tensor cores).")


class Runtime(_Strict):
    name: Literal["onnxruntime", "tflite"]
    execution_providers: list[ExecutionProvider] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime providers in order of preference; each absent one falls back to the next.",
    )
    delegates: list[Literal["xnnpack", "gpu", "nnapi", "edgetpu"]] = Field(default_factory=list)
    supports_fp32: bool = True

    @model_validator(mode="after")
    def _cpu_last(self) -> "Runtime":
        if self.name == "onnxruntime" and self.execution_providers and self.execution_providers[-1] != "CPUExecutionProvider":
            raise ValueError("onnxruntime execution_providers must end with CPUExecutionProvider, the fallback")
        return self


class PrecisionPolicy(_Strict):
    default: Precision
    allowed: list[Precision] = Field(min_length=1, description="Candidates the converter may try, best first.")
    note: str = ""

    @model_validator(mode="after")
    def _default_allowed(self) -> "PrecisionPolicy":
        if self.default not in self.allowed:
            raise ValueError(f"default precision {self.default!r} is not in allowed {self.allowed}")
        return self


class Quantization(_Strict):
    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    reduce_range: bool = False
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "int8"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(default=256, ge=1, le=100_000)


class Pruning(_Strict):
    enabled: bool = False
    channel_ratio: float = Field(default=0.3, gt=0.0, lt=0.95)
    finetune_epochs: int = Field(default=10, ge=0, le=1000)


class Limits(_Strict):
    max_model_mb: float = Field(gt=0)
    memory_mb: int = Field(gt=0, description="RAM available to the model at run time.")
    opset_min: int = Field(default=13, ge=7, le=30)
    opset_max: int = Field(default=21, ge=7, le=30)

    @model_validator(mode="after")
    def _opset_order(self) -> "Limits":
        if self.opset_min > self.opset_max:
            raise ValueError(f"opset_min ({self.opset_min}) is above opset_max ({self.opset_max})")
        return self


class AccuracyBudget(_Strict):
    """One limit per task, each in the metric the task's users read (``--max-drop`` overrides the one that applies)."""

    max_drop: float = Field(default=0.01, ge=0.0, le=1.0, description="Classification: largest accuracy drop (labels) or top-1 "
                            "disagreement; segmentation: per-pixel class disagreement.")
    min_box_agreement: float = Field(default=0.8, ge=0.0, le=1.0, description="Detection: matched-box agreement with the original "
                                     "(same class, IoU >= 0.5, F1 over both models' boxes).")
    min_cosine: float = Field(default=0.99, ge=-1.0, le=1.0, description="Embedding: min cosine to the original's vectors.")
    max_nrmse: float = Field(default=0.05, ge=0.0, description="Regression and other outputs: RMSE over the original output's std.")
    max_abs_error: float = Field(default=0.1, ge=0.0, description="Deprecated and not applied (it was in the output's own units); "
                                 "accepted so older profiles still load.")


class DeviceProfile(_Strict):
    """One device class: what it is, what runs on it, and how to convert for it."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    device: str
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cpu: Cpu
    memory_mb: int = Field(gt=0)
    accelerator: Accelerator = Accelerator()
    runtime: Runtime
    precision: PrecisionPolicy
    quantization: Quantization = Quantization()
    pruning: Pruning = Pruning()
    limits: Limits
    accuracy_budget: AccuracyBudget = AccuracyBudget()
    aliases: list[str] = Field(default_factory=list)
    notes: str = ""
    sources: str = Field(min_length=1, description="Where the facts in this profile come from.")
    abstract: bool = Field(default=False, description="A base for extends:, not a device.")

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, v: list[str]) -> list[str]:
        for a in v:
            if not a or len(a) > 64 or not all(c.isalnum() or c in "._-" for c in a):
                raise ValueError(f"bad alias {a!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DeviceProfile":
        if self.limits.memory_mb > self.memory_mb:
            raise ValueError(f"limits.memory_mb ({self.limits.memory_mb}) exceeds memory_mb ({self.memory_mb})")
        if "fp32" in self.precision.allowed and not self.runtime.supports_fp32:
            raise ValueError("precision.allowed lists fp32 but the runtime does not support fp32")
        if self.runtime.name == "tflite" and "int8-dynamic" in self.precision.allowed:
            raise ValueError("int8-dynamic is an onnxruntime mode; a tflite runtime cannot take it")
        return self

    @property
    def threads(self) -> int:
        return self.cpu.threads

    def describe_host_match(self) -> str:
        """Why host latency is (or is not) a fair stand-in for this device's."""
        if host_matches(self):
            return "host matches profile architecture: latency is measured, not a proxy"
        return f"host is {platform.machine()}, profile is {self.arch}: latency is a host proxy"


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` spelled the way profiles spell it (arm64 -> aarch64, AMD64 -> x86_64)."""
    m = (machine or "").strip().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64", "armv7": "armv7l"}.get(m, m)


# The kernel's /proc/cpuinfo names for what the profiles call dotprod and neon.
_FEATURE_ALIASES = {"asimddp": "dotprod", "asimd": "neon", "asimdhp": "fp16"}


def feature_names(flags: Sequence[str] | set[str]) -> set[str]:
    """CPU flags as the kernel names them, plus the profile spellings of the same features."""
    names = {f.strip().lower() for f in flags if f and f.strip()}
    return names | {alias for kernel, alias in _FEATURE_ALIASES.items() if kernel in names}


def platform_mismatch(profile: DeviceProfile, arch: str, features: Sequence[str] | set[str] | None) -> tuple[str | None, list[str]]:
    """``(why the arch is wrong or None, the profile's features the CPU lacks)`` for a machine's report.

    ``features=None`` means "not reported", which is not the same as "none".
    """
    arch = normalize_arch(arch)
    wrong = None if not arch or arch == profile.arch else f"profile {profile.id} is {profile.arch}, the device is {arch}"
    if features is None:
        return wrong, []
    have = feature_names(features)
    return wrong, [f for f in profile.cpu.features if f.lower() not in have]


def host_matches(profile: DeviceProfile) -> bool:
    """True when latency measured here says something about the device itself."""
    if profile.accelerator.kind != "none":
        return False
    wrong, missing = platform_mismatch(profile, platform.machine(), _host_cpu_features())
    return wrong is None and not missing


def _host_cpu_features() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return feature_names(line.split(":", 1)[1].split())
    return set()


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(
        path, what="profile", max_bytes=MAX_PROFILE_BYTES, error=ProfileError, alias_hint="use extends: instead",
        empty_hint="a profile needs at least id, device, arch, cpu, memory_mb, runtime, precision, limits, sources",
    )


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_validation(path: str, err: ValidationError) -> str:
    return describe_validation_error(f"profile {path}", err)


def _profile_dirs(extra: list[Path] | None) -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("LEPTON_EDGE_PROFILES")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += list(extra or [])
    return dirs


class ProfileRegistry:
    """All profiles visible from the built-ins plus user directories, resolved and validated."""

    def __init__(self, extra_dirs: list[Path] | None = None, *, extra_files: list[Path] | None = None) -> None:
        self._raw: dict[str, tuple[dict[str, Any], str]] = {}
        self._user_paths: set[str] = set()
        # A broken user file must not take every other profile down with it: it is
        # remembered here and reported when it matters (listing, or asking for it).
        self.broken: dict[str, str] = {}
        self._broken_hints: dict[str, str | None] = {}
        builtin = resources.files("lepton_edge.device_profiles")
        for entry in sorted(builtin.iterdir(), key=lambda e: e.name):
            if entry.name.endswith((".yaml", ".yml")):
                self._add(Path(str(entry)))
        for d in _profile_dirs(extra_dirs):
            if not d.is_dir():
                raise ProfileError(f"profiles directory {d} does not exist", hint="check --profiles-dir or LEPTON_EDGE_PROFILES")
            for p in sorted(d.glob("*.y*ml")):
                self._add_user(p)
        for p in extra_files or []:
            self._add_user(p)
        self._resolved: dict[str, DeviceProfile] = {}
        self._aliases: dict[str, str] = {}
        for pid in list(self._raw):
            try:
                prof = self._resolve(pid)
            except ProfileError as e:
                if self._raw[pid][1] not in self._user_paths:
                    raise
                path = self._raw.pop(pid)[1]
                self.broken[path], self._broken_hints[path] = e.message, e.hint
                continue
            for a in prof.aliases:
                if a in self._raw:
                    raise ProfileError(f"alias {a!r} of profile {pid!r} collides with a profile id")
                self._aliases[a] = pid

    def _add_user(self, path: Path) -> None:
        try:
            self._add(path)
        except ProfileError as e:
            self.broken[str(path)], self._broken_hints[str(path)] = e.message, e.hint
            return
        self._user_paths.add(str(path))

    def _add(self, path: Path) -> None:
        data = _read_yaml(path)
        pid = data.get("id")
        if not isinstance(pid, str) or not pid:
            raise ProfileError(f"profile {path} has no id")
        if pid in self._raw:
            other = self._raw[pid][1]
            if Path(other).resolve() == path.resolve():
                return  # the same file named twice (a directory and the command line)
            # Silently replacing a built-in would also change every profile that extends it.
            raise ProfileError(f"profile id {pid!r} in {path} is already defined by {other}",
                               hint=f"give it an id of its own; to adjust {pid}, start the file with `extends: {pid}`")
        self._raw[pid] = (data, str(path))

    def _resolve(self, pid: str, chain: tuple[str, ...] = ()) -> DeviceProfile:
        if pid in self._resolved:
            return self._resolved[pid]
        merged = self._merged(pid, chain)
        try:
            prof = DeviceProfile.model_validate(merged)
        except ValidationError as e:
            raise ProfileError(_format_validation(self._raw[pid][1], e)) from None
        self._resolved[pid] = prof
        return prof

    def _merged(self, pid: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if pid in chain:
            raise ProfileError(f"profile extends: cycle {' -> '.join(chain + (pid,))}")
        if len(chain) >= _MAX_EXTENDS_DEPTH:
            raise ProfileError(f"profile {pid!r}: extends: chain deeper than {_MAX_EXTENDS_DEPTH}")
        if pid not in self._raw:
            raise ProfileError(f"profile {chain[-1]!r} extends unknown profile {pid!r}")
        data = dict(self._raw[pid][0])
        parent = data.pop("extends", None)
        if parent is None:
            return data
        if not isinstance(parent, str):
            raise ProfileError(f"profile {pid!r}: extends must be a profile id")
        base = self._merged(parent, chain + (pid,))
        base.pop("abstract", None)
        base.pop("aliases", None)  # aliases name one profile, they are not inherited
        return _deep_merge(base, data)

    def get(self, name: str) -> DeviceProfile:
        pid = self._aliases.get(name, name)
        if pid not in self._resolved:
            known = ", ".join(sorted(p.id for p in self.devices()))
            if self.broken:
                path, why = next(iter(self.broken.items()))
                raise ProfileError(f"unknown device profile {name!r}; {len(self.broken)} profile file(s) could not be read, e.g. {why}")
            raise ProfileError(f"unknown device profile {name!r}", hint=f"known: {known}")
        prof = self._resolved[pid]
        if prof.abstract:
            raise ProfileError(f"profile {name!r} is abstract (a base for extends:), not a device")
        return prof

    def devices(self) -> list[DeviceProfile]:
        return sorted((p for p in self._resolved.values() if not p.abstract), key=lambda p: p.id)

    def source_of(self, pid: str) -> str:
        return self._raw[pid][1]


def load_profile(name: str, profiles_dir: Path | str | None = None) -> DeviceProfile:
    extra = [Path(profiles_dir)] if profiles_dir else None
    return ProfileRegistry(extra).get(name)


def list_profiles(profiles_dir: Path | str | None = None) -> list[DeviceProfile]:
    extra = [Path(profiles_dir)] if profiles_dir else None
    return ProfileRegistry(extra).devices()


def _builtin_ids() -> set[str]:
    """Ids of the profiles shipped in the package (abstract bases included), whatever the user adds."""
    ids = set()
    for entry in resources.files("lepton_edge.device_profiles").iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            ids.add(str(_read_yaml(Path(str(entry))).get("id")))
    return ids


def validate_profile_file(path: Path | str, *, alongside: Sequence[Path] = (), profiles_dir: Path | None = None) -> DeviceProfile:
    """Validate one file; extends: resolves against the built-ins, ``profiles_dir``, the files
    ``alongside`` it (validated together) and same-directory files it names."""
    path = Path(path)
    data = _read_yaml(path)
    if not data.get("extends"):
        pid = data.get("id")
        if isinstance(pid, str) and pid in _builtin_ids():
            raise ProfileError(f"profile id {pid!r} in {path} is already a built-in profile",
                               hint=f"give it an id of its own; to adjust {pid}, start the file with `extends: {pid}`")
        try:
            return DeviceProfile.model_validate(data)
        except ValidationError as e:
            raise ProfileError(_format_validation(str(path), e)) from None
    chain, seen, parent = [path], {data.get("id")}, data.get("extends")
    builtin_ids = _builtin_ids()
    while isinstance(parent, str) and parent not in builtin_ids and parent not in seen:
        sibling = next((c for c in (path.parent / f"{parent}.yaml", path.parent / f"{parent}.yml") if c.is_file()), None)
        if sibling is None:
            break  # the registry reports the unknown parent
        seen.add(parent)
        chain.append(sibling)
        parent = _read_yaml(sibling).get("extends")
    reg = ProfileRegistry([profiles_dir] if profiles_dir else None, extra_files=[*chain, *alongside])
    if str(path) in reg.broken:
        raise ProfileError(reg.broken[str(path)], hint=reg._broken_hints.get(str(path)))
    return reg._resolve(data["id"])
