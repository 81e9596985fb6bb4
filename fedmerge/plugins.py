"""Objects named by import string (``"package.module:attribute"``), as Flower names its apps
(``"fedmerge_server.app:app"``): how the library and one application reach code they do not import —
a user's task factory, or the ServerApp and ClientApp a simulation runs."""

from __future__ import annotations

import importlib
from typing import Any

from fedmerge.errors import ConfigError


def load_object(spec: str, what: str = "object") -> Any:
    """The attribute named by ``"package.module:attribute"`` (dots allowed in the attribute); a
    :class:`ConfigError` naming ``what``, the string and the cause when it cannot be loaded."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} {spec!r} is not 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
