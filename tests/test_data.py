from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from skinreg.data.images import DEMO_CLASSES, generate_demo_data, list_images, read_image_folder
from skinreg.errors import InputError
from skinreg.data.preprocess import Preprocessing


def test_demo_data_is_deterministic_and_imagefolder_shaped(tmp_path):
    a = generate_demo_data(tmp_path / "a", per_class={"train": 2, "val": 1}, size=32, seed=3)
    b = generate_demo_data(tmp_path / "b", per_class={"train": 2, "val": 1}, size=32, seed=3)
    ia, ib = read_image_folder(a / "train"), read_image_folder(b / "train")
    assert ia.class_names == DEMO_CLASSES and len(ia) == 2 * len(DEMO_CLASSES)
    for pa, pb in zip(ia.paths, ib.paths):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))


def test_calibration_dir_recursive_skips_undecodable_and_warns_when_few(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 20), (200, 100, 50)).save(tmp_path / "sub" / "a.png")
    Image.new("RGB", (20, 20), (20, 100, 50)).save(tmp_path / "b.JPG")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="skinreg"):
        found = list_images(tmp_path)
    assert [p.name for p in found.paths] == ["b.JPG", "a.png"]
    assert found.skipped == ("broken.jpg: UnidentifiedImageError",)
    assert "skipping undecodable" in caplog.text and "only 2 calibration images" in caplog.text


def test_calibration_dir_without_usable_images_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"no usable calibration images .*\(1 undecodable\); pass --calibration-dir"):
        list_images(tmp_path)
    with pytest.raises(InputError, match="calibration directory not found"):
        list_images(tmp_path / "missing")


def test_preprocessing_matches_the_seed_snippet_and_round_trips():
    pre = Preprocessing(input_size=8, labels=("a", "b"))
    rgb = (np.arange(16 * 16 * 3) % 255).astype(np.uint8).reshape(16, 16, 3)
    img = Image.fromarray(rgb)
    # the model export guide's code: resize, /255, (x - mean) / std, NHWC -> NCHW
    seed = (np.asarray(img.resize((8, 8)), dtype=np.float32) / 255.0 - np.array([0.485, 0.456, 0.406])) \
        / np.array([0.229, 0.224, 0.225])
    assert np.allclose(pre.to_array(img), seed.transpose(2, 0, 1), atol=1e-5)
    assert np.allclose(pre.to_array(img, layout="NHWC"), seed, atol=1e-5)
    assert Preprocessing.from_json(pre.to_json()) == pre
