"""Flags from a dataclass for the scripts (contlearn.scripting)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from contlearn.scripting import parse_flags


@dataclass
class _Args:
    steps: int = 10
    rate: float = 0.5
    name: str = "bp"
    quick: bool = False
    paper: bool = True


def test_each_field_is_a_flag_with_its_default_and_type():
    assert parse_flags(_Args, "", []) == _Args()
    args = parse_flags(
        _Args, "", ["--steps", "7", "--rate", "1e-3", "--name", "cbp", "--quick", "--no-paper"]
    )
    assert args == _Args(7, 1e-3, "cbp", True, False)


def test_a_malformed_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_flags(_Args, "", ["--steps", "many"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err
