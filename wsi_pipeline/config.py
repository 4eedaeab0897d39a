"""Where the Hydra config tree lives, and composing an app's config from Python (the demo, tests, scripts).

Each stage's Hydra app reads `configs/<app>.yaml`; `compose_app(app, overrides)` returns exactly the config
that `python -m wsi_pipeline.<app> <overrides>` would see.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_app(app: str, overrides: list[str]) -> DictConfig:
    """configs/<app>.yaml with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=list(overrides))
