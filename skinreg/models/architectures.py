"""Architectures and checkpoint loading.

A checkpoint is a `.pth` holding a state_dict, or a dict with `state_dict` /
`model_state_dict` plus optional metadata (arch, num_classes, labels, input_size, mean, std).
It is always loaded with `weights_only=True`: skinreg never unpickles code it did not write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from skinreg.errors import CheckpointError, InputError, first_line
from skinreg.data.preprocess import Preprocessing

log = logging.getLogger(__name__)


def _tiny_cnn(num_classes: int):
    from skinreg.models.tiny import TinyCNN

    return TinyCNN(num_classes)


def _tv(name: str) -> Callable[[int], Any]:
    def build(num_classes: int):
        import torchvision.models as tvm

        # weights=None: nothing is ever downloaded; weights come from the checkpoint.
        return getattr(tvm, name)(weights=None, num_classes=num_classes)

    return build


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[int], Any]
    head_weight: str  # state_dict key of the classifier weight: its rows are the classes


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("efficientnet_b0", _tv("efficientnet_b0"), "classifier.1.weight"),
        Arch("resnet50", _tv("resnet50"), "fc.weight"),
        Arch("mobilenet_v3_small", _tv("mobilenet_v3_small"), "classifier.3.weight"),
        Arch("mobilenet_v3_large", _tv("mobilenet_v3_large"), "classifier.3.weight"),
        Arch("tiny_cnn", _tiny_cnn, "head.weight"),
    )
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it: saved inside every checkpoint we write."""

    arch: str
    num_classes: int
    preprocessing: Preprocessing

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes, "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(arch=d["arch"], num_classes=int(d["num_classes"]),
                   preprocessing=Preprocessing.from_dict(d["preprocessing"]))


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module in eval mode
    spec: ModelSpec


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise InputError(f"unknown architecture {name!r}: expected one of {', '.join(ARCHS)}; fix --arch")
    return ARCHS[name]


def build_model(arch: str, num_classes: int):
    return get_arch(arch).build(num_classes).eval()


def _split_checkpoint(obj: Any) -> tuple[dict, dict]:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                meta = {k: v for k, v in obj.items() if k != key}
                return obj[key], meta
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise CheckpointError(
        "checkpoint holds no state_dict: expected a dict of tensors or a dict with 'state_dict' or "
        "'model_state_dict'; save with torch.save(model.state_dict(), path)"
    )


def guess_arch(state: dict) -> str | None:
    """The architecture whose state_dict has exactly these keys (the class count aside), or None."""
    keys = set(state)
    for arch in ARCHS.values():
        if set(arch.build(1).state_dict()) == keys:
            return arch.name
    return None


def load_checkpoint(
    path: Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    labels: list[str] | None = None,
) -> LoadedModel:
    """Load a `.pth` into an eval-mode model. Metadata in the file wins over defaults; flags fill
    what the file lacks and must agree with what it carries."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}; pass --checkpoint PATH to an existing .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: say so, in one line
        first = first_line(exc)
        raise CheckpointError(
            f"cannot load {path.name} with weights_only=True ({first}); save a state_dict "
            "(torch.save(model.state_dict(), path)) instead of a pickled model"
        ) from None
    state, meta = _split_checkpoint(obj)
    spec_meta = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    meta = {**meta, **spec_meta, **spec_meta.get("preprocessing", {})}
    return load_state_dict(state, meta=meta, arch=arch, num_classes=num_classes,
                           input_size=input_size, labels=labels, source=path.name)


def load_state_dict(
    state: dict,
    *,
    meta: dict | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    labels: list[str] | None = None,
    source: str = "checkpoint",
) -> LoadedModel:
    meta = meta or {}
    file_arch = meta.get("arch")
    if arch and file_arch and arch != file_arch:
        raise CheckpointError(f"architecture mismatch: --arch {arch} but {source} was saved from {file_arch}; "
                              f"drop --arch or pass --arch {file_arch}")
    arch = arch or file_arch or guess_arch(state) or "efficientnet_b0"
    spec_arch = get_arch(arch)

    head = state.get(spec_arch.head_weight)
    if head is None:
        found = guess_arch(state)
        hint = f"pass --arch {found}" if found else f"pass the --arch it was trained with ({', '.join(ARCHS)})"
        raise CheckpointError(f"architecture mismatch: expected {arch} weights ({spec_arch.head_weight}) "
                              f"but {source} has none; {hint}")
    found_classes = int(head.shape[0])
    if num_classes is not None and num_classes != found_classes:
        raise CheckpointError(f"class-count mismatch: expected {num_classes} classes (--num-classes) but "
                              f"{source} has {found_classes}; pass --num-classes {found_classes}")
    file_classes = meta.get("num_classes")
    if file_classes is not None and int(file_classes) != found_classes:
        raise CheckpointError(f"class-count mismatch: {source} metadata says {file_classes} classes but its "
                              f"weights have {found_classes}; fix the checkpoint metadata")

    labels = list(labels or meta.get("labels") or [f"class_{i}" for i in range(found_classes)])
    if len(labels) != found_classes:
        raise CheckpointError(f"label mismatch: {len(labels)} labels for {found_classes} classes in {source}; "
                              "pass one label per class")
    pre = Preprocessing(
        input_size=int(input_size or meta.get("input_size") or 224),
        mean=tuple(meta.get("mean") or Preprocessing().mean),
        std=tuple(meta.get("std") or Preprocessing().std),
        labels=tuple(labels),
        channel_order=str(meta.get("channel_order") or "RGB"),
    )
    if input_size and meta.get("input_size") and int(meta["input_size"]) != input_size:
        log.warning("exporting at --input-size %d; %s was trained at %s", input_size, source, meta["input_size"])

    model = spec_arch.build(found_classes)
    found = guess_arch(state)
    hint = f"pass --arch {found}" if found else "pass the --arch it was trained with"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "shape mismatch")
        raise CheckpointError(f"architecture mismatch: {source} does not fit {arch} ({detail}); {hint}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"architecture mismatch: {source} does not fit {arch} ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. "
            f"{(result.missing_keys or result.unexpected_keys)[0]}); {hint}"
        )
    model.eval()
    return LoadedModel(model=model, spec=ModelSpec(arch=arch, num_classes=found_classes, preprocessing=pre))


def save_checkpoint(loaded: LoadedModel, path: Path) -> Path:
    """Write a checkpoint that carries its own spec (loadable with weights_only=True)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": loaded.model.state_dict(), "spec": loaded.spec.to_dict(),
                "arch": loaded.spec.arch, "num_classes": loaded.spec.num_classes,
                "labels": list(loaded.spec.preprocessing.labels)}, path)
    return path
