"""A small name → class registry with parameter checking, shared by batch and continual mergers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fedmerge.errors import ConfigError, UnknownAggregatorError

T = TypeVar("T")
C = TypeVar("C", bound=type)


def accepted_params(cls: type) -> set[str]:
    """Keyword parameters of ``cls.__init__`` and of every ``__init__`` along its MRO, plus the names a
    class declares in ``declared_params`` (a parameter block taken through ``**params``)."""
    names: set[str] = set(getattr(cls, "declared_params", ()))
    for klass in cls.__mro__:
        init: Callable[..., Any] | None = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"):
                names.add(p.name)
    return names


class Registry(Generic[T]):
    """Classes of one kind (``kind`` names it in messages) registered under their ``name`` attribute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: C) -> C:
        """Class decorator: make ``cls`` available by ``cls.name``; a name is registered once."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes and self._classes[name] is not cls:
            raise ConfigError(f"{self.kind} name {name!r} is registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownAggregatorError(
                f"no {self.kind} named {name!r}; available: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **params: Any) -> T:
        """Instantiate ``name`` with ``params``, naming unknown parameters and the accepted ones."""
        cls = self.get(name)
        accepted = accepted_params(cls)
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise ConfigError(f"{self.kind} {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
        return cls(**params)
