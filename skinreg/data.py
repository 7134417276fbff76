"""Image sets: calibration directories, ImageFolder eval sets, and the synthetic demo data.

The demo data is synthetic: skin-lesion-like blobs on skin-toned backgrounds, generated
deterministically from a seed, so that tests and the demo run with no download. Point the
flags at real images for real numbers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MIN_CALIBRATION = 50


@dataclass(frozen=True)
class ImageSet:
    """A list of decodable images, with labels when read from an ImageFolder."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    skipped: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def file_list_sha256(self) -> str:
        return hashlib.sha256("\n".join(str(p) for p in self.paths).encode()).hexdigest()

    def content_sha256(self) -> str:
        """sha256 over each image's path relative to the set's root and the sha256 of its bytes: two sets
        with the same names but other pixels (or moved to another folder) are told apart correctly."""
        root = Path(self.source) if self.source else None
        h = hashlib.sha256()
        for p in self.paths:
            rel = p.relative_to(root) if root is not None and p.is_relative_to(root) else p.name
            h.update(f"{rel}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
        return h.hexdigest()

    def classes(self) -> list[str | None]:
        """Each image's class: its label's folder name for an ImageFolder, else the first folder under
        the set's root (calibration sets are often laid out by class too), else None."""
        if self.labels is not None and self.class_names:
            return [self.class_names[label] for label in self.labels]
        out: list[str | None] = []
        for p in self.paths:
            parts = p.relative_to(self.source).parts if self.source and p.is_relative_to(self.source) else ()
            out.append(parts[0] if len(parts) > 1 else None)
        return out


def stratified_sample(images: ImageSet, cap: int, *, seed: int = 0) -> tuple[list[int], dict[str, int]]:
    """Indices of at most `cap` images, drawn per class in proportion to the class sizes (every class
    present gets at least one while the cap allows), seeded; plus the per-class counts drawn.

    Never the first N of a class-sorted list: that would validate on the first classes only."""
    classes = [c or "(unlabelled)" for c in images.classes()]
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    if len(classes) <= cap:
        return list(range(len(classes))), {c: len(ix) for c, ix in sorted(by_class.items())}
    rng = random.Random(seed)
    total = len(classes)
    quota = {c: max(1, (len(ix) * cap) // total) for c, ix in by_class.items()}
    while sum(quota.values()) > cap:  # more classes than the cap: drop from the largest quotas
        quota[max(quota, key=lambda c: (quota[c], c))] -= 1
    spare = sorted(by_class, key=lambda c: (-(len(by_class[c]) * cap / total - quota[c]), c))
    for c in spare:  # hand out what rounding left, largest remainder first
        if sum(quota.values()) >= cap:
            break
        if quota[c] < len(by_class[c]):
            quota[c] += 1
    chosen = sorted(i for c, ix in by_class.items() for i in rng.sample(ix, quota[c]))
    counts = {c: quota[c] for c in sorted(by_class) if quota[c]}
    return chosen, counts


def _decodable(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as exc:
        return f"{path.name}: {type(exc).__name__}"


def list_images(directory: Path, *, what: str = "calibration", flag: str = "--calibration-dir",
                limit: int | None = None, seed: int = 0) -> ImageSet:
    """All JPG/PNG files under `directory` (recursively); undecodable ones are reported and skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{what} directory not found: {directory}; pass {flag} DIR holding JPG/PNG images")
    candidates = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit and len(candidates) > limit:
        candidates = sorted(random.Random(seed).sample(candidates, limit))
    good, skipped = [], []
    for p in candidates:
        problem = _decodable(p)
        (skipped.append(problem) if problem else good.append(p))
    for problem in skipped:
        log.warning("skipping undecodable %s image %s", what, problem)
    if not good:
        raise InputError(f"no usable {what} images in {directory} ({len(skipped)} undecodable); "
                         f"pass {flag} DIR holding JPG or PNG images")
    if len(good) < MIN_CALIBRATION and what == "calibration":
        log.warning("only %d calibration images in %s; 50-200 representative images are recommended",
                    len(good), directory)
    return ImageSet(paths=tuple(good), skipped=tuple(skipped), source=str(directory))


def read_image_folder(directory: Path, *, flag: str = "--eval-dir") -> ImageSet:
    """An ImageFolder: one sub-folder per class, classes in sorted order (torchvision's rule)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"eval directory not found: {directory}; pass {flag} DIR with one folder per class")
    classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{directory} has no class folders; {flag} expects DIR/<class>/<image>.png")
    paths, labels, skipped = [], [], []
    for idx, name in enumerate(classes):
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (directory / name).rglob("*")):
            continue  # an empty class folder contributes nothing (list_images would refuse it)
        found = list_images(directory / name, what="eval", flag=flag)
        paths += found.paths
        labels += [idx] * len(found.paths)
        skipped += found.skipped
    if not paths:
        raise InputError(f"no usable eval images in {directory}; {flag} expects DIR/<class>/<image>.png")
    return ImageSet(paths=tuple(paths), labels=tuple(labels), class_names=tuple(classes),
                    skipped=tuple(skipped), source=str(directory))


# -- synthetic demo data ------------------------------------------------------------------
DEMO_CLASSES = ("benign_nevus", "melanoma", "seborrheic_keratosis", "vascular_lesion")


def _lesion(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    skin = np.array([0.87, 0.70, 0.58]) * rng.uniform(0.75, 1.1) + rng.normal(0, 0.03, 3)
    img = np.ones((size, size, 3), np.float32) * skin
    img += rng.normal(0, 0.02, (size, size, 3))  # skin texture
    cx, cy = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.16, 0.28)
    angle = np.arctan2(yy - cy, xx - cx)
    if label == 1:  # melanoma: irregular border, several dark colours
        r_map = r * (1 + 0.35 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.2 * np.sin(7 * angle))
    else:
        r_map = r * (1 + 0.06 * np.sin(2 * angle + rng.uniform(0, 6)))
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    mask = (dist < r_map).astype(np.float32)
    if label == 0:  # nevus: uniform brown
        colour = np.array([0.45, 0.28, 0.18]) * rng.uniform(0.8, 1.2)
        lesion = np.ones_like(img) * colour
    elif label == 1:
        base = np.array([0.25, 0.15, 0.12]) * rng.uniform(0.7, 1.2)
        blotch = (np.sin(xx * rng.uniform(15, 30)) * np.cos(yy * rng.uniform(15, 30)))[..., None]
        lesion = base + 0.12 * blotch * np.array([1.0, 0.6, 0.9])
    elif label == 2:  # keratosis: waxy tan with a speckled, stuck-on texture
        colour = np.array([0.62, 0.48, 0.32]) * rng.uniform(0.85, 1.1)
        speck = (rng.random((size, size, 1)) > 0.8).astype(np.float32)
        lesion = colour - 0.2 * speck
    else:  # vascular: red-purple
        colour = np.array([0.65, 0.15, 0.30]) * rng.uniform(0.8, 1.15)
        lesion = np.ones_like(img) * colour
    img = img * (1 - mask[..., None]) + lesion * mask[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def synthetic_images(n: int, size: int, *, seed: int) -> list[np.ndarray]:
    """n deterministic lesion-like HWC uint8 images, classes in turn (no files, no download)."""
    return [_lesion(np.random.default_rng([seed, i]), i % len(DEMO_CLASSES), size) for i in range(n)]


def generate_demo_data(out_dir: Path, *, per_class: dict[str, int] | None = None, size: int = 96,
                       seed: int = 0) -> Path:
    """Write out_dir/{train,val,calibration}/<class>/<n>.png deterministically; returns out_dir.

    Re-running with the same arguments rewrites identical files (cheap, idempotent)."""
    from PIL import Image

    per_class = per_class or {"train": 60, "val": 50, "calibration": 25}
    out_dir = Path(out_dir)
    for split_idx, (split, count) in enumerate(per_class.items()):
        for label, name in enumerate(DEMO_CLASSES):
            folder = out_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_idx, label, i])
                Image.fromarray(_lesion(rng, label, size)).save(folder / f"{i:04d}.png")
    return out_dir
