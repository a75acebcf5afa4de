"""Calibration and evaluation data: ``.npz`` files, directories of ``.npy`` or images, or arrays.

Every reader here is bounded (bytes, files, samples) and every failure is one
:class:`CalibrationDataError` line saying what was expected.

Public API: :class:`Dataset`, :func:`load_dataset`, :func:`split_holdout`, :func:`synthetic_dataset`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lepton_edge.bundle import sha256_arrays

from .errors import CalibrationDataError

__all__ = ["Dataset", "InputSpec", "load_dataset", "split_holdout", "synthetic_dataset", "synthetic_inputs", "input_mismatch",
           "range_mismatch", "n_rows", "rows", "MAX_DATA_BYTES", "MAX_DATA_FILES"]

MAX_DATA_BYTES = 4 << 30
MAX_DATA_FILES = 100_000
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm")


Feeds = np.ndarray | dict[str, np.ndarray]


def n_rows(x: Feeds) -> int:
    """Samples in ``x``: one array, or one array per model input (all with the same count)."""
    return int(next(iter(x.values())).shape[0]) if isinstance(x, dict) else int(x.shape[0])


def rows(x: Feeds, sel: Any) -> Feeds:
    """``x[sel]`` for one array or for every array of a per-input dict."""
    return {k: v[sel] for k, v in x.items()} if isinstance(x, dict) else x[sel]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, dtype, and the shape of one sample (no batch axis; None = dynamic)."""

    name: str
    dtype: str
    sample_shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (samples on axis 0) and optional integer labels ``y``.

    ``x`` is one array (a single-input model, fed to its only input), or a dict of one array
    per model input, keyed by the input's name (multi-input models).
    """

    x: Feeds
    y: np.ndarray | None
    origin: str
    synthetic: bool = False

    def __len__(self) -> int:
        return n_rows(self.x)

    @property
    def named(self) -> bool:
        return isinstance(self.x, dict)

    @property
    def sha256(self) -> str:
        xs = [self.x[k] for k in sorted(self.x)] if isinstance(self.x, dict) else [self.x]
        return sha256_arrays(xs if self.y is None else [*xs, self.y])

    def take(self, n: int) -> "Dataset":
        return Dataset(rows(self.x, slice(None, n)), None if self.y is None else self.y[:n], self.origin, self.synthetic)

    def as_single(self, name: str, what: str) -> "Dataset":
        """Per-input arrays given for a single-input model: its one array (named x or by the input)."""
        if not isinstance(self.x, dict):
            return self
        if set(self.x) in ({name}, {"x"}):
            return Dataset(next(iter(self.x.values())), self.y, self.origin, self.synthetic)
        raise CalibrationDataError(f"{what} data {self.origin} holds arrays {', '.join(sorted(self.x)[:4])}; the model takes one input, {name}",
                                   hint=f"give one array, x (or named {name})")

    def fit_inputs(self, specs: Sequence[InputSpec], what: str) -> "Dataset":
        """Per-input data checked against the model's inputs and cast to their dtypes, or one error line naming the input."""
        names = [s.name for s in specs]
        if not isinstance(self.x, dict) or (set(self.x) == {"x"} and "x" not in names):
            raise CalibrationDataError(
                f"{what} data {self.origin} holds one array x, but the model takes {len(specs)} inputs ({_describe(specs)})",
                hint="save one array per input, named by the input: np.savez(path, " + ", ".join(f"{n}=..." for n in names) + ", y=labels)")
        missing = [n for n in names if n not in self.x]
        if missing:
            raise CalibrationDataError(
                f"{what} data {self.origin} has no array for input {missing[0]} (the model takes {_describe(specs)}; "
                f"the data holds {', '.join(sorted(self.x)) or 'nothing'})",
                hint="save one array per input, named by the input: np.savez(path, " + ", ".join(f"{n}=..." for n in names) + ")")
        extra = sorted(set(self.x) - set(names))
        if extra:
            raise CalibrationDataError(f"{what} data {self.origin} holds array {extra[0]}, which is no input of the model "
                                       f"(inputs: {', '.join(names)}; labels go in y)")
        out: dict[str, np.ndarray] = {}
        for s in specs:
            a = self.x[s.name]
            want, got = tuple(s.sample_shape), tuple(a.shape[1:])
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
                raise CalibrationDataError(
                    f"{what} data {self.origin}: input {s.name} has samples of shape {_fmt(got)}; the model takes {_shape(want)} per sample",
                    hint=f"give {s.name} shaped (N, " + ", ".join("?" if d is None else str(d) for d in want) + ")")
            target = np.dtype(s.dtype)
            if a.dtype != target:
                if not np.issubdtype(target, np.floating) and np.issubdtype(a.dtype, np.floating):
                    raise CalibrationDataError(
                        f"{what} data {self.origin}: input {s.name} is {a.dtype} but the model takes {s.dtype}; "
                        "integer inputs (token ids, masks) are not cast from floats",
                        hint=f"save {s.name} as integers, e.g. {s.name}.astype(np.{s.dtype})")
                if np.issubdtype(target, np.integer) and a.dtype != np.bool_ and a.size and (
                        a.min() < np.iinfo(target).min or a.max() > np.iinfo(target).max):
                    raise CalibrationDataError(f"{what} data {self.origin}: input {s.name} holds values outside {s.dtype}")
                a = a.astype(target)
            out[s.name] = np.ascontiguousarray(a)
        return Dataset(out, self.y, self.origin, self.synthetic)

    def fit_to(self, sample_shape: Sequence[int | None], dtype: str, what: str) -> "Dataset":
        """This data cast to the model's input dtype, or an error naming both shapes."""
        want = tuple(sample_shape)
        got = tuple(self.x.shape[1:])
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            shown = "x".join("?" if d is None else str(d) for d in want)
            raise CalibrationDataError(
                f"{what} data {self.origin} has samples of shape {_fmt(got)}; the model takes {shown} per sample",
                hint="give arrays shaped (N, " + ", ".join("?" if d is None else str(d) for d in want) + ")",
            )
        if self.x.dtype == np.dtype(dtype):
            return self
        if np.issubdtype(np.dtype(dtype), np.floating) != np.issubdtype(self.x.dtype, np.floating) and not np.issubdtype(self.x.dtype, np.integer):
            raise CalibrationDataError(f"{what} data {self.origin} is {self.x.dtype}; the model takes {dtype}")
        return Dataset(self.x.astype(dtype), self.y, self.origin, self.synthetic)


def _value_span(x: np.ndarray) -> tuple[float, float]:
    """(0.5th, 99.5th percentile) of the values: the range the data really covers, a few outliers aside."""
    flat = x.reshape(-1)
    if flat.size > 1_000_000:  # a strided subsample is enough for a range
        flat = flat[:: flat.size // 1_000_000 + 1]
    lo, hi = np.percentile(flat.astype(np.float64), [0.5, 99.5])
    return float(lo), float(hi)


def input_mismatch(data: Dataset, dtype: str, what: str) -> str | None:
    """A warning when ``data`` (as given) does not look like inputs of a model taking ``dtype``, else None.

    Integers for a float input are cast as they are, not scaled: data saved straight from a
    source (pixel 0..255, sklearn digits 0..16) for a model trained on scaled inputs would
    calibrate INT8 ranges and judge accuracy on the wrong scale without a word.
    """
    x = data.x
    if not np.issubdtype(np.dtype(dtype), np.floating) or np.issubdtype(x.dtype, np.floating):
        return None
    lo, hi = float(x.min()), float(x.max())
    return (f"{what} data {data.origin} holds integers ({x.dtype}, values {lo:g}..{hi:g}) but the model takes {dtype}; "
            f"they are used as they are, not scaled. If the model was trained on scaled inputs (e.g. divided by 255 or by {hi:g}), "
            f"scale this data the same way, or the INT8 ranges and the accuracy gate are computed on the wrong scale.")


def range_mismatch(calib: Dataset, evaluation: Dataset, factor: float = 4.0) -> str | None:
    """A warning when calibration and evaluation values span ranges ``factor`` apart (preprocessed differently)."""
    (c_lo, c_hi), (e_lo, e_hi) = _value_span(calib.x), _value_span(evaluation.x)
    c_span, e_span = c_hi - c_lo, e_hi - e_lo
    if min(c_span, e_span) <= 0:
        return None if c_span == e_span else (
            f"calibration values span {c_lo:.4g}..{c_hi:.4g} and evaluation values {e_lo:.4g}..{e_hi:.4g}: one of them is constant")
    if max(c_span, e_span) / min(c_span, e_span) < factor:
        return None
    return (f"calibration values span {c_lo:.4g}..{c_hi:.4g} but evaluation values {e_lo:.4g}..{e_hi:.4g}: "
            "are both preprocessed the same way (scaling, normalisation) as the model's real inputs?")


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _shape(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def _describe(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} {s.dtype} N x {_shape(s.sample_shape)}" for s in specs)


def load_dataset(spec: Any, what: str, *, image_size: tuple[int, int] | None = None, channels: int | None = None,
                 input_names: Sequence[str] | None = None) -> Dataset:
    """Read ``spec``: a path (``.npz``, ``.npy``, directory) or an ``(x, y|None)`` tuple or an array.

    ``input_names`` (an ONNX model's inputs) lets an ``.npz`` hold one array per input, named by
    the input, instead of ``x``; a dict ``{name: array}`` (or ``(dict, y)``) is the in-memory form.
    """
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, dict):
        return _checked_named(dict(spec), None, "(arrays)", what)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], dict):
        return _checked_named(dict(spec[0]), None if spec[1] is None else np.asarray(spec[1]), "(arrays)", what)
    if isinstance(spec, np.ndarray):
        return _checked(spec, None, "(array)", what)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and not isinstance(spec, (str, bytes)):
        x, y = spec
        return _checked(np.asarray(x), None if y is None else np.asarray(y), "(arrays)", what)
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if not p.exists():
            raise CalibrationDataError(f"{what} data {p} does not exist")
        if p.is_dir():
            return _load_dir(p, what, image_size, channels)
        return _load_file(p, what, input_names)
    raise CalibrationDataError(f"{what} data must be a path or an (x, y) tuple, got {type(spec).__name__}")


def _checked(x: np.ndarray, y: np.ndarray | None, origin: str, what: str, label: str = "x") -> Dataset:
    if x.dtype == object or x.ndim < 1 or x.shape[0] == 0:
        raise CalibrationDataError(f"{what} data {origin} holds no samples ({label} has shape {x.shape}, dtype {x.dtype})",
                                   hint=f"{label} must be a numeric array with samples on axis 0")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise CalibrationDataError(f"{what} data {origin}: {label} has dtype {x.dtype}, not numbers")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise CalibrationDataError(f"{what} data {origin}: {label} holds NaN or infinite values")
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise CalibrationDataError(
                f"{what} data {origin}: y must be {x.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
    return Dataset(x, y, origin)


def _checked_named(xs: dict[str, np.ndarray], y: np.ndarray | None, origin: str, what: str) -> Dataset:
    """One array per input: each checked as ``x`` is, and all with the same sample count."""
    if not xs:
        raise CalibrationDataError(f"{what} data {origin} holds no input arrays")
    out: dict[str, np.ndarray] = {}
    for name, a in xs.items():
        a = np.asarray(a)
        _checked(a, None, origin, what, label=f"input {name}")
        out[str(name)] = a
    counts = {k: int(a.shape[0]) for k, a in out.items()}
    if len(set(counts.values())) != 1:
        first = next(iter(counts))
        odd = next(k for k, c in counts.items() if c != counts[first])
        raise CalibrationDataError(f"{what} data {origin}: input {odd} has {counts[odd]} samples but {first} has {counts[first]}; "
                                   "every input needs the same number of samples")
    n = next(iter(counts.values()))
    if y is not None and (y.ndim != 1 or y.shape[0] != n or not np.issubdtype(y.dtype, np.integer)):
        raise CalibrationDataError(f"{what} data {origin}: y must be {n} integer labels, got shape {y.shape} dtype {y.dtype}")
    return Dataset(out, y, origin)


def _load_file(p: Path, what: str, input_names: Sequence[str] | None = None) -> Dataset:
    size = p.stat().st_size
    if size > MAX_DATA_BYTES:
        raise CalibrationDataError(f"{what} data {p} is {size} bytes; the limit is {MAX_DATA_BYTES}")
    if p.suffix == ".npy":
        return _checked(_load_npy(p, what), None, str(p), what)
    if p.suffix != ".npz":
        raise CalibrationDataError(f"{what} data {p} is neither .npz nor .npy nor a directory",
                                   hint="give an .npz with array x (and optional y), or a directory of .npy files or images")
    try:
        with zipfile.ZipFile(p) as zf:
            declared = sum(i.file_size for i in zf.infolist())
        if declared > MAX_DATA_BYTES:
            raise CalibrationDataError(f"{what} data {p} expands to {declared} bytes; the limit is {MAX_DATA_BYTES}")
        with np.load(p, allow_pickle=False) as npz:
            names = list(input_names or ())
            arrays = [f for f in npz.files if f != "y"]
            y = npz["y"] if "y" in npz.files else None
            if len(names) > 1:
                # One array per model input, named by the input (fit_inputs names what is missing or extra).
                return _checked_named({f: npz[f] for f in arrays}, y, str(p), what)
            if len(names) == 1 and "x" not in npz.files and names[0] in npz.files:
                if len(arrays) > 1:
                    extra = sorted(set(arrays) - set(names))[0]
                    raise CalibrationDataError(f"{what} data {p} holds array {extra}, which is no input of the model "
                                               f"(inputs: {names[0]}; labels go in y)")
                return _checked(npz[names[0]], y, str(p), what, label=names[0])
            if "x" not in npz.files:
                hint = "save it with np.savez(path, x=inputs, y=labels)"
                if input_names is not None and len(names) == 1:
                    hint = f"the model's input is called {names[0]}: save it with np.savez(path, {names[0]}=inputs, y=labels) (or x=inputs)"
                if input_names is None and len(arrays) > 1:
                    hint = ("one array per input (named by the input) is read for ONNX models only; a PyTorch source takes one "
                            "input tensor x: export the model to ONNX to convert it with several inputs")
                raise CalibrationDataError(f"{what} data {p} has no array named x (it has {sorted(npz.files)[:8]})", hint=hint)
            x = npz["x"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CalibrationDataError(f"{what} data {p} is not a readable .npz: {str(e).splitlines()[0][:200]}") from None
    return _checked(x, y, str(p), what)


def _load_npy(p: Path, what: str) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CalibrationDataError(f"{what} data {p} is not a readable .npy: {str(e).splitlines()[0][:200]}") from None


def _load_dir(d: Path, what: str, image_size: tuple[int, int] | None, channels: int | None) -> Dataset:
    files = []
    for i, f in enumerate(sorted(d.iterdir())):
        if i >= MAX_DATA_FILES:
            raise CalibrationDataError(f"{what} directory {d} has more than {MAX_DATA_FILES} files")
        if f.is_file() and not f.is_symlink() and f.suffix.lower() in (".npy",) + _IMAGE_SUFFIXES:
            files.append(f)
    if not files:
        raise CalibrationDataError(f"{what} directory {d} holds no .npy files or images")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_DATA_BYTES:
        raise CalibrationDataError(f"{what} directory {d} holds {total} bytes; the limit is {MAX_DATA_BYTES}")
    npys = [f for f in files if f.suffix == ".npy"]
    if npys and len(npys) != len(files):
        raise CalibrationDataError(f"{what} directory {d} mixes .npy files and images; use one kind")
    if npys:
        arrays = [_load_npy(f, what) for f in npys]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise CalibrationDataError(f"{what} directory {d}: .npy files have different shapes {sorted(shapes)[:4]}")
        return _checked(np.stack(arrays), None, str(d), what)
    return _checked(_load_images(files, what, image_size, channels), None, str(d), what)


def _load_images(files: list[Path], what: str, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """Images as float32 NCHW in [0, 1], resized to the model's input (preprocessing is the model's job)."""
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationDataError(f"reading {what} images needs Pillow", hint="pip install pillow, or give .npy/.npz data") from None
    mode = "L" if channels == 1 else "RGB"
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.draft(mode, size[::-1] if size else None)  # cheap decode-time downscale for JPEG
                im = im.convert(mode)
                if size:
                    im = im.resize((size[1], size[0]))
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise CalibrationDataError(f"{what} image {f.name} is unreadable: {str(e).splitlines()[0][:200]}") from None
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise CalibrationDataError(f"{what} images have different sizes {sorted(shapes)[:4]}", hint="give --input-shape so they are resized")
    return np.stack(out)


def split_holdout(data: Dataset, fraction: float = 0.25, seed: int = 0, max_eval: int = 512) -> tuple[Dataset, Dataset]:
    """(calibration part, held-out evaluation part), with a fixed shuffle."""
    n = len(data)
    if n < 4:
        raise CalibrationDataError(f"calibration data {data.origin} has {n} samples; at least 4 are needed to hold some out",
                                   hint="give more samples or a separate --eval set")
    idx = np.random.default_rng(seed).permutation(n)
    n_eval = min(max_eval, max(2, int(n * fraction)))
    ev, cal = idx[:n_eval], idx[n_eval:]

    def pick(i: np.ndarray, tag: str) -> Dataset:
        return Dataset(rows(data.x, i), None if data.y is None else data.y[i], f"{data.origin}[{tag}]", data.synthetic)

    return pick(cal, "calibration split"), pick(ev, "held-out split")


def synthetic_dataset(sample_shape: Sequence[int], dtype: str, n: int, seed: int = 0) -> Dataset:
    """Random inputs; they calibrate ranges badly, which is why they need an explicit flag."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *sample_shape)).astype(dtype)
    return Dataset(x, None, "(synthetic)", synthetic=True)


def synthetic_inputs(specs: Sequence[InputSpec], n: int, seed: int = 0, int_high: int = 2) -> Dataset:
    """Random data for a multi-input model: floats standard normal, integers in [0, ``int_high``), booleans random.

    Integer inputs are token ids and masks in the models this serves; values below 2 are valid
    ids for any vocabulary and valid mask values. Every dynamic axis must already be fixed.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for s in specs:
        shape = (n, *(int(d) for d in s.sample_shape))  # type: ignore[arg-type]
        dt = np.dtype(s.dtype)
        if dt == np.bool_:
            out[s.name] = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dt, np.integer):
            out[s.name] = rng.integers(0, int_high, shape).astype(dt)
        else:
            out[s.name] = rng.standard_normal(shape).astype(dt)
    return Dataset(out, None, "(synthetic)", synthetic=True)
