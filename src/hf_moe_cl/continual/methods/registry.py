"""The registry of continual methods: `register_method` adds a `ContinualMethod` subclass under its `name`."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register_method(cls):
    """Class decorator: make a `ContinualMethod` available by its `name` (e.g. to `examples/mtil.py --method`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered.")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise KeyError(f"A continual method is already registered as {cls.name!r} ({METHODS[cls.name].__name__}).")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]
