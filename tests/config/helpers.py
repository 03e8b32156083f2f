"""Shared fixtures for the config tests: the example files and text mutation."""

from __future__ import annotations

from pathlib import Path

from federation.config import ConfigError, ConfigIssue, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEMO = CONFIGS / "demo.yaml"
EXAMPLES = (DEMO, CONFIGS / "multicloud.example.yaml")
DEMO_NAME = "configs/demo.yaml"


def demo_text() -> str:
    return DEMO.read_text()


def mutate(text: str, old: str, new: str) -> str:
    """Replace the first ``old`` (which must exist) with ``new``."""
    assert old in text, f"mutation anchor not found: {old!r}"
    return text.replace(old, new, 1)


def line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first line containing ``needle`` (below the line with ``after``)."""
    start = line_of(text, after) if after else 0
    for number, line in enumerate(text.splitlines(), start=1):
        if number > start and needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def issues_of(text: str, filename: str = DEMO_NAME) -> tuple[ConfigIssue, ...]:
    """The issues parse_config reports; fails the test if the text is accepted."""
    try:
        parse_config(text, filename)
    except ConfigError as exc:
        return exc.issues
    raise AssertionError("config was accepted")
