from __future__ import annotations

import pytest
import torch

from skinreg.errors import CheckpointError, InputError
from skinreg.models.architectures import build_model, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("arch", ["efficientnet_b0", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"])
def test_plain_state_dict_of_each_listed_arch_loads_and_guesses_arch(arch, tmp_path):
    model = build_model(arch, 7)
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path)  # no flags: arch guessed from the keys, classes from the head
    assert loaded.spec.arch == arch
    assert loaded.spec.num_classes == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-5)


def test_dict_checkpoint_metadata_is_used_and_flags_fill_the_rest(tmp_path):
    model = build_model("tiny_cnn", 3)
    path = tmp_path / "c.pth"
    torch.save({"model_state_dict": model.state_dict(), "arch": "tiny_cnn", "labels": ["a", "b", "c"],
                "input_size": 96, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, path)
    loaded = load_checkpoint(path)
    pre = loaded.spec.preprocessing
    assert (pre.input_size, pre.labels, pre.mean, pre.std) == (96, ("a", "b", "c"), (0.5,) * 3, (0.25,) * 3)
    assert load_checkpoint(path, input_size=128).spec.preprocessing.input_size == 128


def test_saved_checkpoint_round_trips_its_spec(trained, tmp_path):
    path = save_checkpoint(trained.loaded, tmp_path / "x.pth")
    again = load_checkpoint(path)
    assert again.spec == trained.loaded.spec


def test_class_count_mismatch_names_expected_and_found(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(build_model("mobilenet_v3_small", 10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"expected 5 classes .* has 10; pass --num-classes 10"):
        load_checkpoint(path, num_classes=5)


def test_architecture_mismatch_names_the_right_arch(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(build_model("mobilenet_v3_small", 4).state_dict(), path)
    with pytest.raises(CheckpointError, match="architecture mismatch.*pass --arch mobilenet_v3_small"):
        load_checkpoint(path, arch="resnet50")
    with pytest.raises(CheckpointError, match="architecture mismatch.*pass --arch mobilenet_v3_small"):
        load_checkpoint(path, arch="mobilenet_v3_large")


def test_pickled_module_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(build_model("tiny_cnn", 2), path)  # a pickled nn.Module, not a state_dict
    with pytest.raises(CheckpointError, match="weights_only=True.*save a state_dict"):
        load_checkpoint(path)


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    path = tmp_path / "m.pth"
    torch.save(build_model("tiny_cnn", 2).state_dict(), path)
    with pytest.raises(InputError, match="unknown architecture 'vgg'"):
        load_checkpoint(path, arch="vgg")
    torch.save({"weights": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_checkpoint(path)

