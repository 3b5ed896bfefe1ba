"""Checks of option values: a refused value names the option, the value and what is valid.

Every options dataclass of the library (`MoELoraConfig`, `ContinualTrainingArguments`, the methods' arguments)
checks its fields with `check_option` in `__post_init__`, so a bad value fails when the options are made, before any
model is built or any task trains. `check_label_space` is the one check of class names and prompt templates, wherever
they come from (a task, a config, a saved file).
"""

from __future__ import annotations

import functools
import math
import string
import warnings
from typing import Any, Optional, Sequence

KIND_NAMES = {bool: "a boolean (True or False)", int: "an integer", float: "a finite number", str: "a string"}


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def is_finite_number(value: Any) -> bool:
    """An int or a finite float, not a bool (JSON's true would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_shape(value: Any) -> bool:
    """A list of non-negative integer sizes (not bools), as a tensor shape read from a file."""
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for naming a bad value in an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return is_finite_number(value) if kind is float else isinstance(value, kind)


def check_option(name: str, value: Any, kind: type, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, choices: Optional[Sequence] = None,
                 optional: bool = False) -> None:
    """Raise ValueError unless `value` is of `kind` (bool, int, float: finite, or str) and lies in the range (`low`,
    `high`; inclusive unless `*_open`) or among `choices`; None passes when `optional`."""
    if value is None and optional:
        return
    valid = _is_kind(value, kind) and (choices is None or value in choices)
    if valid and low is not None:
        valid = value > low if low_open else value >= low
    if valid and high is not None:
        valid = value < high if high_open else value <= high
    if valid:
        return
    if choices is not None:
        wanted = f"one of {tuple(choices)}"
    else:
        wanted = KIND_NAMES[kind]
        if low is not None and high is not None:
            wanted += f" in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
        elif low is not None:
            wanted += f" {'>' if low_open else '>='} {_number(low)}"
        elif high is not None:
            wanted += f" {'<' if high_open else '<='} {_number(high)}"
    raise ValueError(f"`{name}` must be {'None or ' if optional else ''}{wanted}, got {value!r}.")


def check_flags(options: Any, names: Sequence[str]) -> None:
    """Every one of `names` is a boolean attribute of `options` (a string such as 'false' would count as true)."""
    for name in names:
        check_option(name, getattr(options, name), bool)


def _template_problem(template) -> Optional[str]:
    """What is wrong with a prompt template, or None: it must hold exactly one empty replacement field `{}`."""
    if not isinstance(template, str):
        return f"is a {type(template).__name__}, not a string"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        return f"does not parse ({error})"
    if not fields:
        return "has no '{}'"
    if len(fields) > 1:
        return f"has {len(fields)} fields"
    if fields[0] != ("", "", None):
        return f"has the field {{{fields[0][0]}}} (a named, numbered or formatted field)"
    return None


def check_label_space(classnames, templates, owner: str, names_argument: str = "classnames") -> None:
    """Refuse class names that are not a list of distinct non-empty strings, and templates that are not a non-empty
    list of strings with exactly one '{}' each; `owner` starts every message (e.g. "Task 'cifar100'")."""
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        raise ValueError(f"{owner}: `{names_argument}` must be a list of class names (one per label), got "
                         f"{type(classnames).__name__} {short_repr(classnames)}; a string would make one class per "
                         "character.")
    if not classnames:
        raise ValueError(f"{owner} has no class names: pass `{names_argument}` (one per label).")
    if not all(isinstance(name, str) and name.strip() for name in classnames):
        raise ValueError(f"{owner} needs one non-empty class name (a string) per label, got {list(classnames)!r}.")
    duplicates = sorted({name for name in classnames if classnames.count(name) > 1})
    if duplicates:
        raise ValueError(f"{owner} has duplicate class names {duplicates}: two labels with the same prompt cannot be "
                         "told apart. Make every class name unique.")
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        raise ValueError(f"{owner}: `templates` must be a non-empty list of prompt templates, got "
                         f"{short_repr(templates)}.")
    for template in templates:
        problem = _template_problem(template)
        if problem:
            raise ValueError(f"{owner}: the prompt template {template!r} {problem}; a template must contain exactly "
                             "one '{}' where the class name goes (write '{{' and '}}' for braces).")


def check_task_record(name, classnames, templates, owner: str, name_owner: str) -> None:
    """What a saved task is recorded with (an adapter's `task_info`, a ConDU save's tasks): a non-empty name, and
    class names and templates that pass `check_label_space`, since prompts are built from them. `name_owner` starts
    the message about the name, `owner` the others."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{name_owner} must be a non-empty string, got {short_repr(name)}.")
    check_label_space(classnames, templates, owner)


def moved_options(**destinations: str):
    """Class decorator of an options dataclass: keyword arguments that name options it no longer has (`name=
    "where it lives now"`) are still accepted for one minor version, with a FutureWarning naming their new place;
    their values are kept in `moved` (set before `__post_init__`, which may check them) for whoever reads them."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            self.moved = {name: kwargs.pop(name) for name in list(kwargs) if name in destinations}
            for name in self.moved:
                warnings.warn(f"{cls.__name__}({name}=...) is deprecated and will be removed in hf-moe-cl 0.4: "
                              f"{destinations[name]}.", FutureWarning, stacklevel=2)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def refused_names(owner: str, **hints: str):
    """Class decorator of an options dataclass: keyword arguments that are another library's names for its options
    (`name="what to use instead"`) are refused with that hint, not with Python's bare TypeError."""

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            given = sorted(name for name in kwargs if name in hints)
            if given:
                raise ValueError(f"{cls.__name__} has no option " + "; no option ".join(
                    f"`{name}` ({owner}'s): {hints[name]}" for name in given) + ".")
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate
