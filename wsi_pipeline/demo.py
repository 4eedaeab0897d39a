"""`make demo`: the whole pipeline on a small generated cohort, one step after another.

    python -m wsi_pipeline.demo [--out demo_out]

Each step is a function of the `Demo` folders, listed in STEPS; later stages (extract, train,
report) are appended there. Every step resumes: generated slides are kept and each stage skips
slides it has already finished, so a second `make demo` is quick.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .h5io import atomic_path
from .synthetic import Ellipse, SyntheticSlide, blobs, write_slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demo:
    """The demo's folders: generated slides in, stage outputs beside them."""

    root: Path

    @property
    def slides(self) -> Path:
        return self.root / "slides"

    @property
    def preprocessed(self) -> Path:
        """patches/, tissue/, thumbnails/ and manifest.csv of the preprocessing stage."""
        return self.root


def demo_cohort() -> dict[str, SyntheticSlide]:
    """A handful of slides, some scanned at 40x and some at 20x, some with holes in the tissue."""
    cohort = {}
    for i in range(6):
        at_40x = i % 2 == 0
        mpp, mag = (0.25, 40) if at_40x else (0.5, 20)
        width, height = (12288, 10240) if at_40x else (6144, 5120)  # the same 3 x 2.5 mm field of view
        tissue = blobs(width, height, 2 + i % 3, seed=100 + i, fill=0.4)
        holes = [Ellipse(e.cx, e.cy, e.rx / 4, e.ry / 4) for e in tissue[:1]] if i % 3 == 0 else []
        cohort[f"demo_{i:02d}"] = SyntheticSlide(width, height, tissue, holes, mpp=mpp, app_mag=mag, seed=i)
    return cohort


def make_slides(demo: Demo) -> None:
    for name, spec in demo_cohort().items():
        path = demo.slides / f"{name}.tif"
        if not path.is_file():
            with atomic_path(path) as tmp:
                write_slide(tmp, spec)
    log.info("demo slides in %s", demo.slides)


def preprocess(demo: Demo) -> None:
    from .preprocess import compose_config, run  # the same config and code path as `python -m wsi_pipeline.preprocess`

    run(compose_config([f"slides={demo.slides}", f"out={demo.preprocessed}"]))


# The demo's steps, in order. A later stage appends its own step here.
STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("slides", make_slides),
    ("preprocess", preprocess),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="demo folder (default: demo_out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    demo = Demo(args.out)
    for name, step in STEPS:
        log.info("demo step: %s", name)
        step(demo)


if __name__ == "__main__":
    main()
