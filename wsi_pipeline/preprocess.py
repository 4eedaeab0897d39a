"""Stage 1-2: tissue segmentation and patching of a folder of slides (a Hydra app).

    python -m wsi_pipeline.preprocess slides=DIR out=DIR [workers=4] [overwrite=true] [slide.mpp=0.25]
    RANK=r WORLD_SIZE=n python -m wsi_pipeline.preprocess ...   # n processes (e.g. a job array), slides sharded

Writes, per slide, `tissue/<id>.geojson`, `thumbnails/<id>.jpg` and then `patches/<id>.h5`: the .h5
comes last, so its presence marks a finished slide (that is what a re-run skips, provided it records this
run's patching settings). `manifest.csv` gets one row per slide. Per-slide driving (resume, worker
processes, failures, shards' manifests) is `stage.py`'s. Settings: configs/preprocess.yaml; docs: docs/preprocess.md.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import CONFIG_DIR, ConfigError, InvalidSettings, check_settings, compose_app, positive, whole
from .h5io import PatchGrid, write_patches
from .patching import PatchParams, lattice_shape, patch_grid
from .qc import draw_qc, write_thumbnail
from .segment import SegmentParams, Segmentation, segment_slide, write_geojson
from .slide import SLIDE_EXTENSIONS, ReadPlan, Slide, SlideError, list_slides, slide_id_of
from .stage import Outcome, Shard, check_resumable, check_unique_ids, run_per_slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything a slide's preprocessing depends on (picklable, for the worker pool)."""

    segment: SegmentParams = SegmentParams()
    patching: PatchParams = PatchParams()
    mpp_override: float | None = None
    thumbnail_max_px: int = 2048

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "PreprocessSettings":
        """The settings of configs/preprocess.yaml, checked: a bad value or unknown key is a ConfigError."""
        made, problems = {}, []

        def checked(make) -> None:  # every group's problems are collected into one message
            try:
                make()
            except InvalidSettings as err:
                problems.extend(err.problems)

        for name, params in {"segment": SegmentParams, "patching": PatchParams}.items():
            values = OmegaConf.to_container(cfg[name])
            unknown = sorted(set(values) - set(params.__dataclass_fields__))
            if unknown:
                problems.append(f"unknown {name} setting(s) {unknown} (known: {sorted(params.__dataclass_fields__)})")
            else:
                checked(lambda: made.__setitem__(name, params(**values)))
        mpp = (lambda v: v is None or positive()[0](v), "null or level-0 µm/px > 0")
        checked(lambda: check_settings("slide", cfg.slide, {"mpp": mpp}))
        checked(lambda: check_settings("qc", cfg.qc, {"thumbnail_max_px": whole(1)}))
        if problems:
            raise InvalidSettings(problems)
        return cls(**made, mpp_override=cfg.slide.mpp, thumbnail_max_px=cfg.qc.thumbnail_max_px)

    def recorded(self, have: dict) -> dict:
        """The attrs a finished patches file (whose attrs are `have`) must hold to be resumed by this run: the
        settings it records (patch_size, target_mpp, tissue_threshold and the segmentation's, as segment_<key>)
        and, for a slide without µm/px of its own, how this run would resolve its level-0 µm/px (`slide.mpp`, else
        the objective-power guess: mpp_source and level0_mpp). A slide's metadata beats `slide.mpp`, so files of
        slides that have it resume under any `slide.mpp`."""
        want = {**asdict(self.patching), **self.segment_attrs()}
        if have.get("mpp_source", "metadata") != "metadata":
            want["mpp_source"] = "objective_power" if self.mpp_override is None else "override"
            if self.mpp_override is not None:
                want["level0_mpp"] = self.mpp_override
        return want

    def segment_attrs(self) -> dict:
        return {f"segment_{key}": value for key, value in asdict(self.segment).items()}


@dataclass(frozen=True)
class OutputLayout:
    """Where a preprocessing run writes (DESIGN.md)."""

    root: Path

    def patches(self, slide_id: str) -> Path:
        return self.root / "patches" / f"{slide_id}.h5"

    def tissue(self, slide_id: str) -> Path:
        return self.root / "tissue" / f"{slide_id}.geojson"

    def thumbnail(self, slide_id: str) -> Path:
        return self.root / "thumbnails" / f"{slide_id}.jpg"

    def outputs(self, slide_id: str) -> list[Path]:
        """Every file of a slide, its patches file (the mark of a finished slide) first."""
        return [self.patches(slide_id), self.tissue(slide_id), self.thumbnail(slide_id)]

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"


# -- one slide, in three steps (the benchmark times them separately) -------------------------------------

def read_plan(slide: Slide, settings: PreprocessSettings) -> ReadPlan:
    return slide.read_plan(settings.patching.target_mpp, settings.patching.patch_size)


def check_patchable(slide: Slide, plan: ReadPlan) -> None:
    """Fail early on a slide smaller than one patch, or whose pixels at `plan.read_level` cannot be decoded."""
    if 0 in lattice_shape(slide.dimensions, plan.patch_size_level0):
        w, h = slide.dimensions
        raise SlideError(
            f"{slide.path}: the slide ({w}x{h} px at level 0) is smaller than one patch "
            f"({plan.patch_size_level0} px at level 0 = {plan.patch_size} px at {plan.target_mpp} µm/px); "
            "nothing to patch. Lower patching.patch_size if this is intended"
        )
    # Patches will be read from plan.read_level: decode its last tile now (the end of a truncated file).
    last = [d - 1 for d in slide.level_dimensions[plan.read_level]]
    ds = slide.level_downsamples[plan.read_level]
    slide.read_region((int(last[0] * ds), int(last[1] * ds)), plan.read_level, (1, 1))


def segment_step(slide: Slide, plan: ReadPlan, settings: PreprocessSettings) -> Segmentation:
    """Check the slide can be patched and read, then segment its tissue."""
    check_patchable(slide, plan)
    seg = segment_slide(slide, settings.segment)
    if not seg.polygons:
        raise SlideError(
            f"{slide.path}: no tissue found (saturation threshold {seg.threshold:.0f} on the {seg.mask_mpp:.3g} µm/px "
            "mask). If the slide holds faint tissue, lower segment.min_saturation or set segment.method=fixed "
            "segment.threshold=<value>"
        )
    return seg


def patch_step(slide: Slide, plan: ReadPlan, seg: Segmentation, settings: PreprocessSettings) -> PatchGrid:
    threshold = settings.patching.tissue_threshold
    grid = patch_grid(slide.slide_id, seg.mask, seg.scale, slide.dimensions, slide.mpp, plan, threshold)
    # the mask the cells were kept by and where the µm/px came from: compared when a run resumes
    grid.attrs.update(settings.segment_attrs(), mpp_source=slide.mpp_source)
    if len(grid) == 0:
        raise SlideError(
            f"{slide.path}: {seg.tissue_mm2:.3g} mm² of tissue but no lattice cell is at least {threshold:.0%} "
            "tissue; lower patching.tissue_threshold"
        )
    return grid


def write_step(layout: OutputLayout, seg: Segmentation, patches: PatchGrid, settings: PreprocessSettings) -> None:
    """QC outputs first, the .h5 last; on failure remove what this call wrote, so no partial slide remains."""
    slide_id = patches.attrs["slide_id"]
    written = [layout.tissue(slide_id), layout.thumbnail(slide_id)]
    try:
        write_geojson(written[0], seg.polygons)
        write_thumbnail(written[1], draw_qc(seg, patches, settings.thumbnail_max_px))
        write_patches(layout.patches(slide_id), patches)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def process_slide(source: Path, out: Path, settings: PreprocessSettings) -> int:
    """Segment and patch one slide into `out`; returns the number of patches. Bad slides raise SlideError."""
    with Slide(source, mpp_override=settings.mpp_override) as slide:
        plan = read_plan(slide, settings)
        seg = segment_step(slide, plan, settings)
        patches = patch_step(slide, plan, seg, settings)
    write_step(OutputLayout(Path(out)), seg, patches, settings)
    return len(patches)


# -- many slides --------------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> list[Outcome]:
    """Preprocess every slide of `cfg.slides` into `cfg.out` (the Hydra app and the demo both come here)."""
    missing = [key for key in ("slides", "out") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise SlideError(f"missing {' and '.join(missing)}: python -m wsi_pipeline.preprocess slides=DIR out=DIR")
    settings = PreprocessSettings.from_config(cfg)
    layout = OutputLayout(Path(cfg.out))
    shard = Shard.of(cfg.shard.rank, cfg.shard.world_size)
    slides = list_slides(cfg.slides)
    if not slides:
        raise SlideError(f"{cfg.slides}: no slide files in this folder (extensions {', '.join(SLIDE_EXTENSIONS)})")
    check_unique_ids(slides)  # all of them, before sharding: two ids may land on two shards
    if not cfg.overwrite:  # every shard checks the whole folder, so all stop or none
        check_resumable(layout.root, map(slide_id_of, slides), layout.patches, lambda _, have: settings.recorded(have),
                        "patches files")
    sources = shard.take(slides)
    if shard.world_size > 1:
        log.info("shard %d of %d: %d of the %d slides", shard.rank, shard.world_size, len(sources), len(slides))
    work = partial(process_slide, out=layout.root, settings=settings)
    with shard.manifest(layout.root) as manifest:
        outcomes = run_per_slide(sources, work, layout.patches, manifest, overwrite=cfg.overwrite,
                                 workers=cfg.workers, desc="preprocess", outputs_of=layout.outputs)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    log.info("preprocess: %(ok)d ok, %(skipped)d skipped, %(failed)d failed", counts)
    log.info("outputs in %s (manifest: %s)", layout.root, layout.manifest)
    return outcomes


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/preprocess.yaml with command-line style overrides, as the Hydra app would see it."""
    return compose_app("preprocess", overrides)


@hydra.main(config_path=str(CONFIG_DIR), config_name="preprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        outcomes = run(cfg)
    except (SlideError, ConfigError) as err:  # no or a bad `slides=` folder, duplicate ids, a bad setting: one line
        log.error("%s", err)
        sys.exit(1)
    if outcomes and all(o.status == "failed" for o in outcomes):  # nothing for the next stage: stop a make chain
        log.error("every slide failed (%d); the reasons are above and in %s", len(outcomes),
                  OutputLayout(Path(cfg.out)).manifest)
        sys.exit(1)


if __name__ == "__main__":
    main()
