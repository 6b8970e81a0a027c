"""Class maps: sorted class names -> index, identified by a version hash.

The hash travels into checkpoints and exports, so a model is never paired with a
different class order than the one it was trained with.
"""

from __future__ import annotations

import hashlib
import json


def label_map_version(classes: list[str]) -> str:
    """Short, stable hash of the ordered class list."""
    return hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()[:16]
