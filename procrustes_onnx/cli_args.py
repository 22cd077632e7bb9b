"""Argument types and parsers for the CLI: every bad flag value ends in one `error: ...` line naming the
flag as the user typed it, with exit code 2, never in a traceback from deep inside a stage."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from procrustes_onnx.core.errors import EXIT_USER_ERROR, UserError

__all__ = ["Parser", "count", "SEED_MAX", "THREADS_MAX", "fraction", "parse_kept", "parse_layers", "parse_structures", "parse_list"]


class Parser(argparse.ArgumentParser):
    """argparse with the tool's error format: one line, `error: <problem>: <fix>`, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}: see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


SEED_MAX = 2**32 - 1      # numpy's and torch's seeds both take it
THREADS_MAX = 1024        # more would only make ONNX Runtime and torch spawn threads by the thousand


def count(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in minimum..maximum (windows, batch sizes, threads, samples...)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is too large: it must be at most {maximum}")
        return value

    parse.__name__ = f"count>={minimum}"
    return parse


def fraction(low: float, high: float, *, low_open: bool = True, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval low..high (ends open or closed as given)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"{value:g} is outside {span}")
        return value

    parse.__name__ = f"number in {span}"
    return parse


def parse_list(flag: str, text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_layers(flag: str, text: str) -> list[int]:
    """'0,29' -> [0, 29]; a value that is not a layer index is refused naming the flag."""
    out = []
    for item in parse_list(flag, text):
        try:
            out.append(int(item))
        except ValueError:
            raise UserError(f"{flag} {text!r}: {item!r} is not a layer index; write e.g. {flag} 0,5") from None
        if out[-1] < 0:
            raise UserError(f"{flag} {text!r}: layer {out[-1]} is negative; layers count from 0")
    return out


def parse_kept(flag: str, text: str) -> dict[str, float]:
    """'q=0.375,k=0.375' -> {'q': 0.375, 'k': 0.375}."""
    try:
        pairs = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in parse_list(flag, text))}
    except ValueError:
        raise UserError(f"{flag} {text!r} is not role=fraction pairs: write e.g. {flag} q=0.375,k=0.375") from None
    if not pairs:
        raise UserError(f"{flag} is empty: write e.g. {flag} q=0.375,k=0.375")
    return pairs


def parse_structures(flag: str, text: str) -> dict[str, str]:
    """'down=gs,q=kron' -> {'down': 'gs', 'q': 'kron'}."""
    pairs = {}
    for item in parse_list(flag, text):
        role, sep, kind = item.partition("=")
        if not sep or not role.strip() or not kind.strip():
            raise UserError(f"{flag} {text!r}: {item!r} is not role=structure; write e.g. {flag} down=gs,q=kron")
        pairs[role.strip()] = kind.strip()
    if not pairs:
        raise UserError(f"{flag} is empty: write e.g. {flag} down=gs,q=kron")
    return pairs
