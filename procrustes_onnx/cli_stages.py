"""CLI verbs for the pipeline stages (compress, export, rewrite, inspect, eval, generate, run)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Stage verbs are added here as their library functions land."""
