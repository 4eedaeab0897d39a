"""`make demo`: the whole pipeline on a small generated cohort, one step after another.

    python -m wsi_pipeline.demo [--out demo_out]

Each step is a function of the `Demo` folders, listed in STEPS: generate the slides and labels,
preprocess, extract features (random_proj_demo, not a pathology model), split, train 2DMambaMIL and
ABMIL on a classification and a survival task, and report. Every step goes through the same code as
its command-line app and resumes: slides are kept, stages skip finished slides, the trainer skips
finished folds, so a second `make demo` is quick.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

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
    def labels(self) -> Path:
        return self.root / "labels.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def runs(self) -> Path:
        """One run dir per task x model: runs/<task>/<model>/fold_<k>/..."""
        return self.root / "runs"

    @property
    def preprocessed(self) -> Path:
        """patches/, tissue/, thumbnails/ and manifest.csv of the preprocessing stage."""
        return self.root

    @property
    def features(self) -> Path:
        """The extraction stage's output folder: features/<encoder>/<slide_id>.h5."""
        return self.root / "features"

    @property
    def encoder_features(self) -> Path:
        """The demo encoder's feature files, the trainer's input."""
        return self.features / DEMO_ENCODER


# Two made-up diagnoses that differ in staining (a stand-in for morphology a real encoder would see).
DEMO_CLASSES = {"benign": (222, 140, 180), "tumour": (172, 104, 186)}
N_DEMO_SLIDES = 16
# No download, and NOT a pathology model (docs/extract.md): enough to tell the two stainings apart.
DEMO_ENCODER = "random_proj_demo"


def demo_cohort() -> dict[str, tuple[str, SyntheticSlide]]:
    """Slides named demo_<i>, each with its diagnosis; half scanned at 40x and half at 20x, some with holes."""
    cohort = {}
    names = list(DEMO_CLASSES)
    for i in range(N_DEMO_SLIDES):
        label = names[i % 2]
        at_40x = (i // 2) % 2 == 0
        mpp, mag = (0.25, 40) if at_40x else (0.5, 20)
        width, height = (12288, 10240) if at_40x else (6144, 5120)  # the same 3 x 2.5 mm field of view
        tissue = blobs(width, height, 2 + i % 3, seed=100 + i, fill=0.4)
        holes = [Ellipse(e.cx, e.cy, e.rx / 4, e.ry / 4) for e in tissue[:1]] if i % 3 == 0 else []
        spec = SyntheticSlide(width, height, tissue, holes, mpp=mpp, app_mag=mag, seed=i, stain=DEMO_CLASSES[label])
        cohort[f"demo_{i:02d}"] = (label, spec)
    return cohort


def demo_labels(seed: int = 0) -> pd.DataFrame:
    """One case per slide; diagnosis plus made-up survival (tumour cases die sooner), CLAM/MCAT columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for slide_id, (label, _) in demo_cohort().items():
        months = (20.0 if label == "tumour" else 80.0) * np.exp(rng.normal(0.0, 0.5))
        censored = rng.random() < 0.25
        if censored:
            months *= rng.uniform(0.3, 1.0)
        rows.append(dict(case_id=f"case_{slide_id[-2:]}", slide_id=slide_id, label=label,
                         survival_months=round(float(months), 2), censorship=int(censored)))
    return pd.DataFrame(rows)


def make_slides(demo: Demo) -> None:
    for name, (_, spec) in demo_cohort().items():
        path = demo.slides / f"{name}.tif"
        if not path.is_file():
            with atomic_path(path) as tmp:
                write_slide(tmp, spec)
    with atomic_path(demo.labels) as tmp:
        demo_labels().to_csv(tmp, index=False)
    log.info("demo slides in %s, labels in %s", demo.slides, demo.labels)


def preprocess(demo: Demo) -> None:
    from .preprocess import compose_config, run  # the same config and code path as `python -m wsi_pipeline.preprocess`

    run(compose_config([f"slides={demo.slides}", f"out={demo.preprocessed}"]))


def extract(demo: Demo) -> None:
    from .extract import compose_config, run  # the same config and code path as `python -m wsi_pipeline.extract`

    run(compose_config([f"slides={demo.slides}", f"patches={demo.preprocessed / 'patches'}",
                        f"out={demo.features}", f"encoder={DEMO_ENCODER}"]))


# What the demo trains: every task config x every model, over DEMO_FOLDS patient-level folds.
DEMO_TASKS = ("demo", "demo_survival")
DEMO_MODELS = ("mamba2d", "abmil")
DEMO_FOLDS = 3
DEMO_EPOCHS = 20
DEMO_LR = 1e-3  # a tiny cohort: the paper's 1e-4 would need many more epochs


def splits(demo: Demo) -> None:
    from .splits import make_splits, write_splits  # the code path of `python -m wsi_pipeline.splits`

    if not (demo.splits / f"splits_{DEMO_FOLDS - 1}.csv").is_file():
        write_splits(make_splits(pd.read_csv(demo.labels, dtype={"case_id": str}), DEMO_FOLDS, 0.25), demo.splits)


def train(demo: Demo) -> None:
    from .train import compose_config, run_fold  # the code path of `python -m wsi_pipeline.train`

    for task in DEMO_TASKS:
        for model in DEMO_MODELS:
            for fold in range(DEMO_FOLDS):
                run_fold(compose_config([
                    f"task={task}", f"model={model}", f"fold={fold}", f"features={demo.encoder_features}",
                    f"task.labels_csv={demo.labels}", f"task.splits_dir={demo.splits}",
                    f"run_dir={demo.runs / task / model}", f"train.epochs={DEMO_EPOCHS}", f"train.lr={DEMO_LR}",
                    "train.workers=0",
                ]))


def report(demo: Demo) -> None:
    from .report import make_reports, report_config  # the code path of `python -m wsi_pipeline.report`

    for task in DEMO_TASKS:
        runs = [str(demo.runs / task / model) for model in DEMO_MODELS]
        for path in make_reports(runs, report_config(f"slides={demo.slides}", "c_index.n_bootstrap=200")):
            log.info("report: %s", path)


# The demo's steps, in order.
STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("slides", make_slides),
    ("preprocess", preprocess),
    ("extract", extract),
    ("splits", splits),
    ("train", train),
    ("report", report),
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
