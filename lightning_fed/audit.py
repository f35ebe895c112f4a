"""What leaves a site, described without its values: for audits of the privacy promise.

With ``FederatedStrategy(audit_messages=True)`` the coordinator records the structure of every message a site
sends it, and the driver the structure of every result a site returns: paths, array shapes and dtypes, scalar
types. ``strategy.federation.audit()`` returns both. Values are never recorded, so the audit log itself leaks
nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def describe(obj: Any, path: str = "") -> list[tuple[str, str, tuple, str]]:
    """``(path, kind, shape, dtype)`` for every leaf of ``obj``: ``array`` (numpy or torch), ``scalar``, ``text``,
    ``none``, or ``object`` (anything else, by type name)."""
    if obj is None:
        return [(path, "none", (), "")]
    if isinstance(obj, np.ndarray) or (hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "numel")):
        return [(path, "array", tuple(obj.shape), str(obj.dtype))]
    if isinstance(obj, (bool, int, float, np.generic)):
        return [(path, "scalar", (), type(obj).__name__)]
    if isinstance(obj, str):
        return [(path, "text", (len(obj),), "str")]
    if isinstance(obj, dict):
        return [leaf for key, value in obj.items() for leaf in describe(value, f"{path}/{key}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, value in enumerate(obj) for leaf in describe(value, f"{path}[{i}]")]
    if dataclasses.is_dataclass(obj):
        return [leaf for f in dataclasses.fields(obj) for leaf in describe(getattr(obj, f.name), f"{path}.{f.name}")]
    return [(path, "object", (), type(obj).__name__)]
