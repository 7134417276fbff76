"""A short trainer for the demo: enough to get a checkpoint clearly above chance on the synthetic
data, so that accuracy drops of quantized variants are measurable here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from skinreg.data.images import read_image_folder
from skinreg.models.architectures import LoadedModel, ModelSpec, build_model
from skinreg.data.preprocess import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    loaded: LoadedModel
    train_accuracy: float
    val_accuracy: float
    chance: float
    epochs: int


def _recalibrate_batchnorm(model, x, max_batch: int = 256, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics from the training images, in one batch of up to
    `max_batch` images. torchvision's MobileNetV3 uses BN momentum 0.01, so after a short run the
    running stats are still near their initial values and eval-mode predictions collapse to one class.
    Averaging the statistics of small batches is not enough either: it misses the spread between
    batch means, and a briefly trained network leans on per-batch statistics. A one-off comparison
    while developing, on EfficientNet-B0 trained 4 epochs on the demo data: recalibrated in batches of
    16, eval accuracy 67 % with logits up to 4470; in one batch of 240, 96.5 % with logits up to 130."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: with one batch, exactly that batch's statistics
    if len(x) > max_batch:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_batch]]
    # Only BatchNorm in train mode: dropout and stochastic depth (EfficientNet) must not be active while
    # the statistics are measured, or they describe activations that eval mode never sees.
    model.eval()
    for bn in bns:
        bn.train()
    with torch.no_grad():
        model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def train(data_dir: Path, *, arch: str = "tiny_cnn", input_size: int = 96, epochs: int = 8,
          batch_size: int = 16, lr: float = 2e-3, seed: int = 0, threads: int = 2, label_smoothing: float = 0.0,
          progress: Callable[[str], None] = lambda msg: None) -> TrainResult:
    """data_dir holds train/ and val/ ImageFolders (see data.generate_demo_data)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    train_set = read_image_folder(Path(data_dir) / "train", flag="--data-dir")
    val_set = read_image_folder(Path(data_dir) / "val", flag="--data-dir")
    pre = Preprocessing(input_size=input_size, labels=train_set.class_names)
    x_train = torch.from_numpy(pre.batch(train_set.paths))
    y_train = torch.tensor(train_set.labels)
    x_val = torch.from_numpy(pre.batch(val_set.paths))
    y_val = np.asarray(val_set.labels)

    model = build_model(arch, len(train_set.class_names))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        correct, seen = 0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            xb, yb = x_train[idx], y_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb, label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        progress(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, train acc {100 * correct / max(seen, 1):.1f}%")
    _recalibrate_batchnorm(model, x_train, seed=seed)
    model.eval()
    with torch.inference_mode():
        val_acc = float((model(x_val).argmax(1).numpy() == y_val).mean() * 100)
    spec = ModelSpec(arch=arch, num_classes=len(train_set.class_names), preprocessing=pre)
    return TrainResult(loaded=LoadedModel(model=model, spec=spec), train_accuracy=100 * correct / max(seen, 1),
                       val_accuracy=val_acc, chance=100 / len(train_set.class_names), epochs=epochs)
