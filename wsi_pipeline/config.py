"""Where the Hydra config tree lives, and composing an app's config from Python (the demo, tests, scripts).

Each stage's Hydra app reads `configs/<app>.yaml`; `compose_app(app, overrides)` returns exactly the config
that `python -m wsi_pipeline.<app> <overrides>` would see.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A setting out of its range or not among its choices; the message names the key and what it accepts."""


class InvalidSettings(ConfigError):
    """Settings that their rules reject, each problem a line of `problems` (one message lists them all)."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = list(problems)
        super().__init__(f"invalid setting(s): {'; '.join(self.problems)}" + (f"; {hint}" if hint else ""))


Rule = tuple[Callable[[Any], bool], str]  # (accepts the value?, what it must be)


def check_settings(group: str, settings: object, rules: dict[str, Rule], hint: str = "") -> None:
    """Raise one ConfigError listing every field of `settings` (a dataclass or DictConfig of config group `group`,
    "" for the top level) that its rule rejects: checked when a stage starts, so a bad value fails the run once,
    before any slide."""
    prefix = f"{group}." if group else ""
    bad = [f"{prefix}{key}={getattr(settings, key)!r} (must be {what})" for key, (accepts, what) in rules.items()
           if not accepts(getattr(settings, key))]
    if bad:
        raise InvalidSettings(bad, hint)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_of(*choices) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(map(str, choices))}"


def whole(minimum: int, *words: str) -> Rule:
    """A whole number >= minimum, or one of `words` (such as "auto")."""
    return ((lambda v: v in words or (isinstance(v, int) and not isinstance(v, bool) and v >= minimum)),
            " or ".join([*words, f"a whole number >= {minimum}"]))


def positive(what: str = "a number") -> Rule:
    return (lambda v: _number(v) and v > 0), f"{what} > 0"


def within(low: float, high: float, what: str = "a number") -> Rule:
    return (lambda v: _number(v) and low <= v <= high), f"{what} from {low} to {high}"


def compose_app(app: str, overrides: list[str]) -> DictConfig:
    """configs/<app>.yaml with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=list(overrides))
