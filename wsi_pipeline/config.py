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


Rule = tuple[Callable[[Any], bool], str]  # (accepts the value?, what is accepted)


def check_settings(group: str, settings: object, rules: dict[str, Rule]) -> None:
    """Raise one ConfigError listing every field of `settings` (a dataclass of config group `group`) that its rule
    rejects: checked when the settings are made, so a bad value fails the run once, before any slide."""
    bad = [f"{group}.{key}={getattr(settings, key)!r} ({what})" for key, (accepts, what) in rules.items()
           if not accepts(getattr(settings, key))]
    if bad:
        raise ConfigError("invalid setting" + ("s" if len(bad) > 1 else "") + ": " + "; ".join(bad))


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def non_negative(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def compose_app(app: str, overrides: list[str]) -> DictConfig:
    """configs/<app>.yaml with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=list(overrides))
