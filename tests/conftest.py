"""Shared fixtures: small generated slides (real pyramidal TIFFs that OpenSlide opens)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_pipeline.synthetic import Ellipse, SyntheticSlide, blobs, write_slide


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory):
    """make(name, **SyntheticSlide fields) -> path of a written slide; cached by name for the session."""
    root = tmp_path_factory.mktemp("slides")
    cache: dict[str, Path] = {}

    def make(name: str, folder: Path | None = None, **fields) -> Path:
        key = f"{folder}/{name}"
        if key not in cache:
            fields.setdefault("width", 8192)
            fields.setdefault("height", 6144)
            fields.setdefault("tissue", blobs(fields["width"], fields["height"], 3, seed=1))
            cache[key] = write_slide((folder or root) / name, SyntheticSlide(**fields))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def slide_40x(slide_factory) -> Path:
    """8192 x 6144 px at 0.25 µm/px (40x), three tissue blobs, JPEG tiles."""
    return slide_factory("slide_40x.tif")


@pytest.fixture(scope="session")
def slide_20x(slide_factory) -> Path:
    """4096 x 3072 px at 0.5 µm/px (20x): the same field of view as slide_40x at half the resolution."""
    return slide_factory(
        "slide_20x.tif", width=4096, height=3072, mpp=0.5, app_mag=20,
        tissue=[Ellipse(e.cx / 2, e.cy / 2, e.rx / 2, e.ry / 2) for e in blobs(8192, 6144, 3, seed=1)],
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module on one torch thread (for modules of tiny tensors; see pytestmark there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
