"""mediapipe internals (checked against mediapipe 1.2.2).

MediaPipe Tasks imports TensorFlow only for its API documentation's decorators
(`mediapipe/tasks/python/core/optional_dependencies.py`: `from tensorflow.tools.docs import doc_controls`,
with a no-op fallback when TensorFlow is absent). That import costs about 4 s and brings jax along. The
consumer check's MediaPipe child process (registry/mediapipe_check.py) classifies only, so it imports
MediaPipe Tasks as if TensorFlow were absent: 0.7 s instead of 5 s per app-ready file checked. Only that
child process does this; nothing else ever calls `import_vision_without_tensorflow`.
"""

from __future__ import annotations

import sys
from typing import Any

from skinreg._compat import InternalMoved, moved

CHECKED_AGAINST = "1.2.2"
_WHERE = "mediapipe.tasks.python.core.optional_dependencies (TensorFlow only for doc_controls)"


def import_vision_without_tensorflow() -> tuple[Any, Any]:
    """(mediapipe, mediapipe.tasks.python.vision) in a process that has not imported TensorFlow and never
    will: TensorFlow is marked absent in this process first."""
    if "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None:
        raise InternalMoved("import_vision_without_tensorflow: TensorFlow is already imported in this process; "
                            "call it only in the consumer check's MediaPipe child process")
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import tensorflow` raises ModuleNotFoundError
    import mediapipe
    from mediapipe.tasks.python import vision

    return mediapipe, vision


def problems() -> list[str]:
    from importlib import resources

    try:
        source = resources.files("mediapipe.tasks.python.core").joinpath("optional_dependencies.py").read_text()
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return [moved("mediapipe", CHECKED_AGAINST, _WHERE, "import_vision_without_tensorflow")]
    if "except ModuleNotFoundError" not in source or "tensorflow" not in source:
        return [moved("mediapipe", CHECKED_AGAINST, _WHERE, "import_vision_without_tensorflow")]
    return []
