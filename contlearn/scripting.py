"""Command-line flags for the readable scripts in ``scripts/``: one flag per field of a
dataclass, so a script's options are declared once, with their defaults and help."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def parse_flags(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    """``cls`` (a dataclass with defaults) from flags ``--field-name VALUE``; a bool field is
    a switch (``--name`` / ``--no-name``).

    Args:
        cls: the dataclass; each field's type is that of its default.
        description: the ``--help`` text.
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    values: dict[str, Any] = vars(parser.parse_args(argv))
    return cls(**values)
