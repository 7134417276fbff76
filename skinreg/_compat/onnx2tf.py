"""onnx2tf internals (checked against onnx2tf 1.29.24)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from skinreg._compat import InternalMoved, moved

CHECKED_AGAINST = "1.29.24"


def use_sample_data(sample: Callable[..., np.ndarray]) -> None:
    """What onnx2tf checks its conversion on: `sample` instead of the 20 images its
    download_test_image_data reads from the working directory or downloads from GitHub. The name is
    looked up in onnx2tf's module at call time; replacing it is idempotent, changes only what onnx2tf
    itself downloads, and leaves the working directory alone (a chdir would break a service's paths)."""
    import onnx2tf.onnx2tf as impl

    if not hasattr(impl, "download_test_image_data"):
        raise InternalMoved(moved("onnx2tf", CHECKED_AGAINST, "onnx2tf.onnx2tf.download_test_image_data",
                                  "use_sample_data"))
    if impl.download_test_image_data is not sample:
        impl.download_test_image_data = sample


def problems() -> list[str]:
    import onnx2tf.onnx2tf as impl

    if not hasattr(impl, "download_test_image_data"):
        return [moved("onnx2tf", CHECKED_AGAINST, "onnx2tf.onnx2tf.download_test_image_data", "use_sample_data")]
    return []
