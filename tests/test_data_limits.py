"""Limits on what an image set may cost to read (skinreg.data.images.open_image, list_images, read_image_folder,
Preprocessing.load, datasets.fetch): the format a file's suffix declares, a pixel cap read from the header
before decoding, a byte cap per set, checked before decoding and, for a URI, before downloading. Every
refusal is one InputError line naming the file or set and the fix. The hostile files are built on the fly."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from skinreg.data import images as data_module
from skinreg.data.images import list_images, read_image_folder
from skinreg.data.sources import CACHE_ENV, resolve_data
from skinreg.errors import InputError
from skinreg.data.preprocess import Preprocessing

MAX_IMAGE_PIXELS_ENV = "SKINREG_MAX_IMAGE_PIXELS"
MAX_SET_BYTES_ENV = "SKINREG_MAX_DATA_BYTES"


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR is patched to declare width x height (CRC fixed): a few dozen bytes
    that a decoder would expand to width * height pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


def _image(path: Path, size: int = 20, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 120, 90)).save(path, format=fmt)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, above 89 megapixels
def test_a_png_header_over_the_pixel_cap_is_refused_before_decoding(tmp_path):
    _image(tmp_path / "fine.png")
    huge = _png_declaring(tmp_path / "huge.png", 12000, 12000)  # 144 megapixels, under Pillow's own bomb limit
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        list_images(tmp_path)
    assert time.perf_counter() - start < 1.0  # nothing was decoded
    assert _one_line(err).startswith(f"{huge}: 12000x12000 is 144000000 pixels, over the 40000000-pixel cap")
    assert MAX_IMAGE_PIXELS_ENV in str(err.value) and "downscale it" in str(err.value)
    with pytest.raises(InputError, match=r"huge\.png: 12000x12000 .* over the 40000000-pixel cap"):
        Preprocessing(input_size=8).load(huge)
    # one over Pillow's own limit too: the same one line, naming the file
    bomb = _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(InputError) as err:
        Preprocessing(input_size=8).batch([bomb])
    assert _one_line(err).startswith(f"{bomb}: ") and "over the 40000000-pixel cap" in str(err.value)
    # without the hostile files the folder reads as before
    huge.unlink()
    bomb.unlink()
    assert [p.name for p in list_images(tmp_path).paths] == ["fine.png"]


def test_the_pixel_cap_is_settable_by_environment_and_argument(tmp_path, monkeypatch):
    small, large = _image(tmp_path / "a" / "small.jpg", 10), _image(tmp_path / "a" / "large.JPEG", 20)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "300")  # 10x10 passes, 20x20 does not
    with pytest.raises(InputError, match=r"large\.JPEG: 20x20 is 400 pixels, over the 300-pixel cap on one image"):
        list_images(tmp_path / "a")
    with pytest.raises(InputError, match=r"large\.JPEG: 20x20 is 400 pixels, over the 300-pixel cap"):
        Preprocessing(input_size=8).load(large)
    assert Preprocessing(input_size=8).load(small).shape == (3, 8, 8)
    assert len(list_images(tmp_path / "a", max_pixels=400)) == 2  # an argument wins over the environment
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV)
    with pytest.raises(InputError, match=r"large\.JPEG: 20x20 is 400 pixels, over the 399-pixel cap"):
        read_image_folder(tmp_path, max_pixels=399)


@pytest.mark.parametrize("env", [MAX_IMAGE_PIXELS_ENV, MAX_SET_BYTES_ENV])
def test_a_bad_limit_setting_is_one_line(tmp_path, monkeypatch, env):
    _image(tmp_path / "a.png")
    monkeypatch.setenv(env, "lots")
    with pytest.raises(InputError, match=rf"^bad {env} 'lots': expected a positive whole number of .*; fix or "
                                         r"unset it$"):
        list_images(tmp_path)


@pytest.mark.parametrize("name, fmt, found, declared", [
    ("scan.png", "TIFF", "TIFF", "PNG"),
    ("photo.jpg", "PNG", "PNG", "JPEG"),
    ("photo.jpeg", "GIF", "GIF", "JPEG"),
    ("lesion.png", "BMP", "BMP", "PNG"),
    ("lesion.PNG", "JPEG", "JPEG", "PNG"),
])
def test_a_file_holding_another_format_than_its_suffix_declares_is_refused(tmp_path, name, fmt, found, declared):
    _image(tmp_path / "ok" / "fine.png")
    _image(tmp_path / "ok" / "fine.jpg")
    assert [p.name for p in list_images(tmp_path / "ok").paths] == ["fine.jpg", "fine.png"]
    bad = _image(tmp_path / "ok" / name, fmt=fmt)
    with pytest.raises(InputError) as err:
        list_images(tmp_path / "ok")
    assert _one_line(err) == (f"{bad}: holds a {found} image, not {declared} as its suffix {bad.suffix} declares; "
                              f"convert it to {declared} or remove it from the folder")
    with pytest.raises(InputError, match=rf"holds a {found} image, not {declared}"):
        Preprocessing(input_size=8).load(bad)


def test_a_single_image_is_read_only_by_its_declared_format(tmp_path):
    pre = Preprocessing(input_size=8)
    assert pre.load(_image(tmp_path / "x.webp", fmt="WEBP")).shape == (3, 8, 8)
    assert pre.load(_image(tmp_path / "x.tiff", fmt="TIFF")).shape == (3, 8, 8)
    assert pre.batch([_image(tmp_path / "x.JPG", fmt="JPEG"), _image(tmp_path / "y.png")]).shape == (2, 3, 8, 8)
    unnamed = _image(tmp_path / "upload", fmt="PNG")
    with pytest.raises(InputError, match=r"upload: no suffix: skinreg reads image files named .*\.png.*; rename it"):
        pre.load(unnamed)
    with pytest.raises(InputError, match=r"x\.webp\.png: holds a WEBP image, not PNG"):
        with data_module.open_image((tmp_path / "x.webp").rename(tmp_path / "x.webp.png")):
            pass


def test_the_byte_cap_counts_the_whole_set_before_decoding(tmp_path, monkeypatch):
    for cls in ("a", "b"):
        for i in range(3):
            _image(tmp_path / "eval" / cls / f"{i}.png", 16)
    per_class = sum(p.stat().st_size for p in (tmp_path / "eval" / "a").iterdir())
    monkeypatch.setenv(MAX_SET_BYTES_ENV, str(per_class + 1))  # one class fits, the two together do not
    assert len(list_images(tmp_path / "eval" / "a")) == 3
    with pytest.raises(InputError) as err:
        read_image_folder(tmp_path / "eval")
    assert _one_line(err).startswith(f"eval set {tmp_path / 'eval'} holds ")
    assert (f"over the {per_class + 1} B cap on one image set; pass --eval-dir a smaller set, or raise "
            f"{MAX_SET_BYTES_ENV} (bytes)") in str(err.value)
    # checked from the sizes alone: nothing is opened
    monkeypatch.setattr(data_module, "open_image", lambda *a, **k: pytest.fail("an image was opened"))
    with pytest.raises(InputError, match=r"^calibration set .* over the .* cap on one image set; pass "
                                         r"--calibration-dir a smaller set or a lower --calibration-size, or raise"):
        list_images(tmp_path / "eval", limit=5, max_bytes=per_class)
    with pytest.raises(InputError, match=r"^calibration set .* over the 100 B cap"):
        list_images(tmp_path / "eval", max_bytes=100)


def test_a_uri_over_the_byte_cap_is_refused_before_it_is_downloaded(tracking, tmp_path, monkeypatch):
    import mlflow.artifacts

    folder = tmp_path / "calibration"
    for i in range(3):
        _image(folder / "x" / f"{i}.png", 16)
    total = sum(p.stat().st_size for p in folder.rglob("*.png"))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="data/calibration")
    uri = f"runs:/{run.info.run_id}/data/calibration"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(MAX_SET_BYTES_ENV, str(total - 1))
    downloads = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: downloads.append(kw) or real(**kw))
    with pytest.raises(InputError) as err:
        resolve_data(uri, what="calibration")
    assert _one_line(err) == (f"calibration data at {uri} holds at least {total} B ({total} bytes), over the "
                              f"{total - 1} B cap on one image set; pass --calibration-dir a smaller folder or "
                              f"artifact URI, or raise {MAX_SET_BYTES_ENV} (bytes)")
    assert downloads == [] and not any((tmp_path / "cache").glob("*/*"))
    # a store that lists no sizes: the downloaded files are checked before they are hashed or cached
    monkeypatch.setattr("skinreg.data.sources.listed_bytes", lambda *a, **k: None)
    with pytest.raises(InputError, match=rf"^calibration data at {uri} holds {total} B"):
        resolve_data(uri, what="calibration")
    assert len(downloads) == 1 and [p.name for p in (tmp_path / "cache").iterdir()] == []
    # within the cap: fetched and read as before
    monkeypatch.setenv(MAX_SET_BYTES_ENV, str(total))
    fetched = resolve_data(uri, what="calibration")
    assert len(list_images(fetched.path)) == 3
