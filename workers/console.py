"""What the command-line modules share: the parser whose errors are one line, option types with ranges, printing
a line, and loading the base model as the settings say."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from common.settings import get_settings


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def load_model(model: str) -> tuple[str, Any, Any]:
    """The base pipeline and its classifier (None when none is configured), as settings say."""
    from adaptors.generation import configure_threads, load_pipeline
    from adaptors.readers.registry import load_classifier

    settings = get_settings()
    configure_threads(settings.torch_threads)
    pipe = load_pipeline(model, settings.device, settings.offline)
    return model, pipe, load_classifier(settings.classifier, model, device=pipe.device)


class UsageError(Exception):
    """Bad input found after parsing (it needs the model, or several options at once): exit 2, one line."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, not {value}")
        return value

    return parse


def float_in(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        if not lo <= value <= hi:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, not {text}")
        return value

    return parse


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
