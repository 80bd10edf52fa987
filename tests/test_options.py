"""CLI options derived from pydantic models: defaults and bounds come from the Field, pydantic validates."""

import argparse
from typing import Literal

import pytest
from pydantic import BaseModel, Field, field_validator

from scdkit.cli import _Parser
from scdkit.errors import UsageError
from scdkit.options import add_model_options, model_from_args


class Inner(BaseModel):
    width: int = Field(8, ge=1, description="inner width")


class Config(BaseModel):
    noise_draws: int = Field(2, ge=1, description="decoder noise draws per encoder pass")
    ema: float = Field(0.999, ge=0, lt=1)
    flag: bool = True
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    sizes: list[int] = [16, 32]
    inner: Inner = Inner()


def parser(**kwargs) -> argparse.ArgumentParser:
    p = _Parser(prog="scdkit test")
    add_model_options(p, Config, **kwargs)
    return p


def flat_help(p: argparse.ArgumentParser) -> str:
    return " ".join(p.format_help().split())  # argparse wraps lines at the terminal width


def test_help_shows_each_default_and_bound_once():
    text = flat_help(parser())
    for expected in ("--noise-draws NOISE_DRAWS decoder noise draws per encoder pass (default: 2, value >= 1)",
                     "--ema EMA (default: 0.999, 0 <= value < 1)", "--flag, --no-flag (default: True)",
                     "--mode {a,b} (default: a)", "--limit N --sizes", "(default: 16 32)"):
        assert text.count(expected) == 1, expected
    assert text.count("default") == 5  # one per option with a default: the formatter appended nothing
    assert "--inner" not in text  # nested models are added by their own call


def test_not_given_falls_back_to_field_defaults():
    args = parser().parse_args([])
    assert args.noise_draws is None and args.flag is None
    assert model_from_args(Config, args) == Config()


def test_given_values_reach_the_model():
    args = parser().parse_args(["--noise-draws", "3", "--ema", "0.5", "--no-flag", "--mode", "b", "--limit", "7",
                                "--sizes", "1", "2", "3"])
    config = model_from_args(Config, args)
    assert (config.noise_draws, config.ema, config.flag, config.mode, config.limit, config.sizes) == \
        (3, 0.5, False, "b", 7, [1, 2, 3])
    assert model_from_args(Config, parser().parse_args(["--flag"])).flag is True


def test_bound_violation_is_one_line_usage_error():
    with pytest.raises(UsageError) as info:
        model_from_args(Config, parser().parse_args(["--ema", "1.5"]))
    assert str(info.value) == "--ema 1.5: Input should be less than 1"
    assert info.value.exit_code == 2


def test_several_violations_share_one_line():
    with pytest.raises(UsageError) as info:
        model_from_args(Config, parser().parse_args(["--ema", "1.5", "--noise-draws", "0"]))
    message = str(info.value)
    assert "\n" not in message
    assert message.split("; ") == ["--noise-draws 0: Input should be greater than or equal to 1",
                                   "--ema 1.5: Input should be less than 1"]


def test_validator_message_loses_value_error_prefix():
    class Even(BaseModel):
        count: int = 2

        @field_validator("count")
        @classmethod
        def _even(cls, value: int) -> int:
            if value % 2:
                raise ValueError("must be even")
            return value

    p = _Parser(prog="scdkit test")
    add_model_options(p, Even)
    with pytest.raises(UsageError, match=r"^--count 3: must be even$"):
        model_from_args(Even, p.parse_args(["--count", "3"]))


def test_non_integer_is_an_argparse_error(capsys):
    plain = argparse.ArgumentParser(prog="plain")
    add_model_options(plain, Config)
    with pytest.raises(SystemExit) as info:
        plain.parse_args(["--noise-draws", "2.5"])
    assert info.value.code == 2
    assert "argument --noise-draws: invalid int value: '2.5'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="invalid int value"):  # scdkit's parser turns it into one line
        parser().parse_args(["--limit", "x"])
    with pytest.raises(UsageError, match="invalid choice"):
        parser().parse_args(["--mode", "c"])


def test_exclude_and_overrides():
    p = _Parser(prog="scdkit test")
    add_model_options(p, Config, exclude=["mode"])
    add_model_options(p.add_argument_group("inner"), Inner)  # a nested model: its own call, its own options
    with pytest.raises(UsageError, match="unrecognized arguments: --mode"):
        p.parse_args(["--mode", "b"])
    args = p.parse_args(["--noise-draws", "5", "--width", "3"])
    config = model_from_args(Config, args, mode="b", inner=model_from_args(Inner, args))
    assert (config.noise_draws, config.mode, config.inner) == (5, "b", Inner(width=3))
    with pytest.raises(UsageError, match=r"^--width 0: Input should be greater than or equal to 1$"):
        model_from_args(Inner, p.parse_args(["--width", "0"]))
