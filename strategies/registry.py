"""Aggregators by name.

Built-in algorithms register themselves with :func:`register_aggregator`; third-party packages declare an entry
point in the group ``lightning_fed.aggregators``::

    [project.entry-points."lightning_fed.aggregators"]
    my_rule = "my_package.rules:MyRule"

and ``FederatedStrategy(aggregator="my_rule")`` / ``Trainer(strategy="my_rule")`` find it.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from lightning_fed.strategies.base import Aggregator

ENTRY_POINT_GROUP = "lightning_fed.aggregators"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, type["Aggregator"]] = {}

A = TypeVar("A", bound=type)


def register_aggregator(name: str) -> Callable[[A], A]:
    """Class decorator: make an :class:`Aggregator` available by ``name`` (lower-case, as Lightning's flags are)."""
    if not _NAME.match(name):
        raise ValueError(
            f"aggregator name {name!r} must be lower-case letters, digits and '_' (Lightning lower-cases strategy flags)"
        )

    def decorate(cls: A) -> A:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"aggregator name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_aggregators() -> list[str]:
    """Every name that :func:`get_aggregator` accepts: built-ins and installed entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_aggregator(name: str, **kwargs: Any) -> "Aggregator":
    """Build the aggregator registered as ``name`` with ``kwargs``."""
    key = name.lower()  # built-in rules are registered: importing this module ran the package's __init__ first
    if key not in _REGISTRY:
        ep = _entry_points().get(key)
        if ep is not None:
            register_aggregator(key)(ep.load())
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown aggregator {name!r}: choose one of {', '.join(available_aggregators())}, "
            f"or register your own with @register_aggregator or the {ENTRY_POINT_GROUP!r} entry point"
        )
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad options for aggregator {key!r}: {err}") from None
