"""Image sets: calibration directories, ImageFolder eval sets, and the synthetic demo data.

The demo data is synthetic: skin-lesion-like blobs on skin-toned backgrounds, generated
deterministically from a seed, so that tests and the demo run with no download. Point the
flags at real images for real numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinreg.errors import InputError

log = logging.getLogger(__name__)

# The image formats read, by file suffix: a file is opened only with the decoder its suffix declares
# (never whichever decoder Pillow would pick from its content). Image sets are made of IMAGE_SUFFIXES
# files; a single image handed to `Preprocessing.load` may be any of SUFFIX_FORMATS.
SUFFIX_FORMATS: dict[str, tuple[str, ...]] = {
    ".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",), ".webp": ("WEBP",), ".bmp": ("BMP",),
    ".tif": ("TIFF",), ".tiff": ("TIFF",),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MIN_CALIBRATION = 50

# Limits on what an image folder may cost to read, checked before any pixel is decoded. Each has an
# environment override, read when it is checked.
MAX_IMAGE_PIXELS = 40_000_000  # width * height of one image, from its header
MAX_IMAGE_PIXELS_ENV = "SKINREG_MAX_IMAGE_PIXELS"
MAX_SET_BYTES = 2 * 1024 ** 3  # the files of one image set (a folder, or what is fetched for one URI)
MAX_SET_BYTES_ENV = "SKINREG_MAX_DATA_BYTES"

# Leading bytes of image formats, to name what a refused file holds.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"8BPS", "PSD"),
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"), (b"icns", "ICNS"),
    (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"gimp xcf", "XCF"), (b"\x0a\x05\x01\x08", "PCX"),
)


def _limit(env: str, default: int, what: str) -> int:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"bad {env} {raw!r}: expected a positive whole number of {what} (default {default}); "
                         f"fix or unset it")
    return value


def max_image_pixels() -> int:
    """The most pixels (width * height) one image may have: $SKINREG_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS."""
    return _limit(MAX_IMAGE_PIXELS_ENV, MAX_IMAGE_PIXELS, "pixels")


def max_set_bytes() -> int:
    """The most bytes the files of one image set may total: $SKINREG_MAX_DATA_BYTES, else MAX_SET_BYTES."""
    return _limit(MAX_SET_BYTES_ENV, MAX_SET_BYTES, "bytes")


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    scaled, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:.1f} {unit}"


def check_set_bytes(total: int, where: str, *, fix: str, limit: int | None = None, at_least: bool = False) -> None:
    """Refuse an image set whose files total more than the byte cap (`where` names the set; `at_least`:
    `total` is a lower bound, e.g. a listing that stopped once past the cap)."""
    cap = limit if limit is not None else max_set_bytes()
    if total > cap:
        raise InputError(f"{where} holds {'at least ' if at_least else ''}{human_bytes(total)} ({total} bytes), "
                         f"over the {human_bytes(cap)} cap on one image set; {fix}, or raise {MAX_SET_BYTES_ENV} "
                         "(bytes)")


def _sniff(path: Path) -> str | None:
    """The image format the file's leading bytes declare, when it is one of _SIGNATURES."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def open_image(path: Path | str, *, max_pixels: int | None = None):  # -> PIL.Image.Image
    """Open an image file for decoding, by the rules every image set is read with:

    - only with the decoder its suffix declares (SUFFIX_FORMATS): a file holding another image format is an
      InputError naming the file; content no decoder of its suffix recognises is PIL's UnidentifiedImageError;
    - only while its width * height, read from the header, is within `max_pixels` (default
      max_image_pixels()), else an InputError: nothing is decoded before that check.

    The caller closes the image (`with open_image(p) as im:`)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    formats = SUFFIX_FORMATS.get(path.suffix.lower())
    if formats is None:
        raise InputError(f"{path}: {repr(path.suffix) if path.suffix else 'no'} suffix: skinreg reads image files "
                         f"named {', '.join(sorted(SUFFIX_FORMATS))} (the suffix names the format); rename it to "
                         "match its content, or pass an opened PIL image")
    cap = max_pixels if max_pixels is not None else max_image_pixels()
    try:
        im = Image.open(path, formats=list(formats))  # reads the header only
    except UnidentifiedImageError:
        found = _sniff(path)
        if found is not None and found not in formats:
            raise InputError(f"{path}: holds a {found} image, not {' or '.join(formats)} as its suffix "
                             f"{path.suffix} declares; convert it to {formats[0]} or remove it from the folder"
                             ) from None
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{path}: more pixels than Pillow opens at all (a decompression bomb), over the {cap}-pixel "
                         "cap on one image; downscale it or remove it from the folder") from None
    width, height = im.size
    if width * height > cap:
        im.close()
        raise InputError(f"{path}: {width}x{height} is {width * height} pixels, over the {cap}-pixel cap on one "
                         f"image; downscale it or remove it from the folder, or raise {MAX_IMAGE_PIXELS_ENV}")
    return im


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


def _decodable(path: Path, max_pixels: int) -> str | None:
    """None when the file passes open_image's checks and verifies; else why it is skipped. A file that
    breaks the rules (another format than its suffix declares, over the pixel cap) is an InputError."""
    try:
        with open_image(path, max_pixels=max_pixels) as im:
            im.verify()
        return None
    except InputError:
        raise
    except Exception as exc:
        return f"{path.name}: {type(exc).__name__}"


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _total_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def list_images(directory: Path, *, what: str = "calibration", flag: str = "--calibration-dir",
                limit: int | None = None, seed: int = 0, max_pixels: int | None = None,
                max_bytes: int | None = None) -> ImageSet:
    """All JPG/PNG files under `directory` (recursively); undecodable ones are reported and skipped.

    Before any is decoded, the files read (after the `limit` subsample) must total at most `max_bytes`
    (default max_set_bytes()), and each is read by open_image's rules (its suffix's format only, at most
    `max_pixels` pixels): a file or a set breaking them is an InputError, not a skip."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{what} directory not found: {directory}; pass {flag} DIR holding JPG/PNG images")
    candidates = _image_files(directory)
    if limit and len(candidates) > limit:
        candidates = sorted(random.Random(seed).sample(candidates, limit))
    check_set_bytes(_total_bytes(candidates), f"{what} set {directory}", limit=max_bytes,
                    fix=f"pass {flag} a smaller set" + (" or a lower --calibration-size" if limit else ""))
    pixels = max_pixels if max_pixels is not None else max_image_pixels()
    good, skipped = [], []
    for p in candidates:
        problem = _decodable(p, pixels)
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


def read_image_folder(directory: Path, *, flag: str = "--eval-dir", max_pixels: int | None = None,
                      max_bytes: int | None = None) -> ImageSet:
    """An ImageFolder: one sub-folder per class, classes in sorted order (torchvision's rule). The limits
    are list_images's, the byte cap over all classes together."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"eval directory not found: {directory}; pass {flag} DIR with one folder per class")
    classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{directory} has no class folders; {flag} expects DIR/<class>/<image>.png")
    files = {name: _image_files(directory / name) for name in classes}
    check_set_bytes(sum(_total_bytes(f) for f in files.values()), f"eval set {directory}", limit=max_bytes,
                    fix=f"pass {flag} a smaller set")
    paths, labels, skipped = [], [], []
    for idx, name in enumerate(classes):
        if not files[name]:
            continue  # an empty class folder contributes nothing (list_images would refuse it)
        found = list_images(directory / name, what="eval", flag=flag, max_pixels=max_pixels, max_bytes=max_bytes)
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
