"""Stage 3: frozen features for every patch of every slide, as `features/<encoder>/<slide_id>.h5`.

    python -m wsi_pipeline.extract slides=DIR patches=DIR out=DIR encoder=uni encoder.weights=/path/pytorch_model.bin
    torchrun --nproc_per_node=G -m wsi_pipeline.extract ...    # one process per GPU, slides sharded by rank

Per slide (through `stage.run_per_slide`: resume, atomic writes, manifest, failure isolation), the
cells of `patches/<slide_id>.h5` are read by DataLoader workers (each opens its own slide handles;
`patch_reader` decodes JPEG tiles directly where it can) and encoded in batches on the GPU (bf16
autocast, channels-last, optional torch.compile). One DataLoader streams the cells of all the
slides to do, in order (`SlideStream`), so the workers read the next slide while the GPU finishes
the current one; each slide's features are still written, and can fail, on their own.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm.auto import tqdm

from .config import CONFIG_DIR, ConfigError, Rule, check_settings, compose_app, one_of, whole
from .encoders import Encoder, WeightsError, create_encoder
from .h5io import FeatureGrid, FormatError, PatchGrid, read_attrs, read_patches, write_features
from .patch_reader import READERS, PatchReader, SlideSource, choose_reader
from .slide import ReadPlan, Slide, SlideError, list_slides, slide_id_of
from .stage import Outcome, Shard, check_resumable, check_unique_ids, run_per_slide

log = logging.getLogger(__name__)

PLAN_ATTRS = ("target_mpp", "patch_size", "patch_size_level0", "read_level", "read_size")
OPEN_READERS_PER_WORKER = 2  # the slide in progress and the next one
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # autocast dtype on a GPU (None: off)
# A patches file's level0_mpp and the slide's µm/px come from the same metadata: any real difference is another slide.
MPP_MATCH_TOLERANCE = 1e-3


# The run-wide settings checked before the encoder is built.
SETTINGS: dict[str, Rule] = {
    "reader": one_of("auto", *READERS),
    "precision": one_of(*PRECISIONS),
    "features_dtype": one_of(*FEATURE_DTYPES),
    "num_workers": whole(0, "auto"),
    "batch_size": whole(1),
    "loader_batch_size": whole(1),
    "prefetch_factor": whole(1),
}


def check_run_settings(cfg: DictConfig) -> None:
    """Every run-wide setting at once, against its registry: one message naming each bad one."""
    missing = [key for key in ("slides", "patches", "out") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: python -m wsi_pipeline.extract slides=DIR patches=DIR out=DIR")
    check_settings("", cfg, SETTINGS, hint="see configs/extract.yaml")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or a batch job's share), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity on this platform
        return os.cpu_count() or 1


# -- reading cells in DataLoader workers ----------------------------------------------------------
@dataclass(frozen=True)
class CellKey:
    """One cell to read: row `index` of its slide's patches file, level-0 top-left (x, y)."""

    source: SlideSource
    index: int
    x: int
    y: int
    min_size: int  # the encoder's input size; readers return their cheapest size at least this large


class CellDataset(Dataset):
    """Maps a `CellKey` to {image: uint8 (s, s, 3), index, slide, error}; each worker keeps its own readers.

    A cell that cannot be read comes back with `error` set (and no image), so the main process can
    fail the slide with one clear message rather than a worker's traceback.
    """

    def __init__(self) -> None:
        self._readers: OrderedDict[tuple, PatchReader] = OrderedDict()

    def forget_readers(self) -> None:
        """Drop handles inherited from the parent process (never share an OpenSlide handle across fork)."""
        self._readers = OrderedDict()

    def reader(self, source: SlideSource) -> PatchReader:
        key = (source.path, source.reader, source.plan)
        if key not in self._readers:
            while len(self._readers) >= OPEN_READERS_PER_WORKER:
                self._readers.popitem(last=False)[1].close()
            self._readers[key] = READERS[source.reader](source)
        self._readers.move_to_end(key)
        return self._readers[key]

    def __getitem__(self, key: CellKey) -> dict:
        item = {"image": None, "index": key.index, "slide": key.source.path, "error": ""}
        try:
            item["image"] = np.require(self.reader(key.source).read(key.x, key.y, key.min_size), np.uint8, "CW")
        except (SlideError, OSError, cv2.error) as err:
            item["error"] = f"cell {key.index} at level-0 (x, y) = ({key.x}, {key.y}): {err}"
        return item

    def __len__(self) -> int:  # keys come from a batch sampler, never from range(len(dataset))
        raise TypeError("CellDataset is indexed by CellKey")


def collate_cells(items: list[dict]) -> dict:
    """One slide's cells: stacked images, row indices, and the errors (images dropped if any)."""
    errors = [item["error"] for item in items if item["error"]]
    images = torch.from_numpy(np.stack([item["image"] for item in items])) if not errors else torch.empty(0)
    return {"image": images, "index": torch.tensor([item["index"] for item in items]),
            "slide": items[0]["slide"], "error": errors}


@dataclass
class PreparedSlide:
    patches: PatchGrid
    source: SlideSource


class SlideStream:
    """The batch sampler: every cell of every slide to do, in order, in batches that never mix slides.

    Slides are prepared (patches file read, reader chosen) lazily, as the DataLoader asks for more
    cells, so the workers start on the next slide while the GPU finishes the current one. What a
    slide's preparation gave (or the error it raised) is kept in `prepared` for the consumer.
    """

    def __init__(self, slides: Sequence[Path], prepare: Callable[[Path], PreparedSlide], batch_size: int,
                 min_size: int) -> None:
        self.slides = [str(s) for s in slides]
        self.position = {slide: i for i, slide in enumerate(self.slides)}
        self.prepare, self.batch_size, self.min_size = prepare, batch_size, min_size
        self.prepared: dict[str, PreparedSlide | Exception] = {}

    def __iter__(self) -> Iterator[list[CellKey]]:
        for slide in self.slides:
            try:
                ready = self.prepared[slide] = self.prepare(Path(slide))
            except Exception as err:  # noqa: BLE001 - raised when this slide's turn comes, not the current one's
                self.prepared[slide] = err
                continue
            keys = [CellKey(ready.source, i, int(x), int(y), self.min_size) for i, (x, y) in enumerate(ready.patches.coords)]
            for start in range(0, len(keys), self.batch_size):
                yield keys[start:start + self.batch_size]


def _init_worker(worker_id: int) -> None:
    # Workers are forked. Nothing here may touch a thread pool the parent may have started: OpenCV's
    # (cv2.setNumThreads in a child whose parent ran parallel cv2 code deadlocks), OpenMP's. The
    # readers only call single-threaded decoders (cv2.imdecode, PIL); DataLoader already limits torch.
    get_worker_info().dataset.forget_readers()


def make_loader(batches: Iterable[list[CellKey]], num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    return DataLoader(
        CellDataset(), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=collate_cells, worker_init_fn=_init_worker if num_workers else None,
        prefetch_factor=prefetch_factor if num_workers else None,
    )


# -- one slide ------------------------------------------------------------------------------------
def read_plan_of(patches: PatchGrid, path: Path) -> ReadPlan:
    missing = [key for key in PLAN_ATTRS if key not in patches.attrs]
    if missing:
        raise FormatError(f"{path}: attrs {missing} missing; re-run preprocessing for this slide")
    a = patches.attrs
    return ReadPlan(float(a["target_mpp"]), int(a["patch_size"]), int(a["patch_size_level0"]),
                    int(a["read_level"]), int(a["read_size"]))


def check_patches_fit(patches: PatchGrid, path: Path, slide: Slide, plan: ReadPlan) -> None:
    """The patches file must have been made from this slide: its id, level-0 size and µm/px (where recorded)."""
    a = patches.attrs
    problems = []
    if a.get("slide_id") != slide.slide_id:
        problems.append(f"its slide_id is {a['slide_id']!r}" if "slide_id" in a else "it has no slide_id attr")
    if "level0_dimensions" in a and tuple(map(int, a["level0_dimensions"])) != tuple(slide.dimensions):
        (w, h), (sw, sh) = a["level0_dimensions"], slide.dimensions
        problems.append(f"its level-0 size is {w}x{h} px, the slide's {sw}x{sh} px")
    if "level0_mpp" in a and not math.isclose(float(a["level0_mpp"]), slide.mpp, rel_tol=MPP_MATCH_TOLERANCE):
        problems.append(f"its level-0 resolution is {float(a['level0_mpp']):.4g} µm/px, the slide's {slide.mpp:.4g}")
    if plan.read_level >= slide.level_count:
        problems.append(f"it reads level {plan.read_level}, the slide has {slide.level_count} levels")
    if problems:
        raise FormatError(f"{path} does not belong to {slide.path}: {'; '.join(problems)}. "
                          "Re-run preprocessing for this slide (or put its own patches file there)")


class Extractor:
    """The per-slide work function of the stage: `extractor(slide_path) -> n_patches`, writing one file.

    `plan(slides)` announces the slides to come, in the order they will be asked for; one DataLoader
    then streams all their cells, so reading never stops at a slide boundary. A slide asked for out of
    that order (or without a plan) restarts the stream from it.
    """

    def __init__(self, encoder: Encoder, patches_dir: Path, out_dir: Path, cfg: DictConfig, device: torch.device):
        self.encoder, self.patches_dir, self.out_dir, self.cfg, self.device = encoder, patches_dir, out_dir, cfg, device
        self.model = encoder.model.to(device)
        if device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.slides: list[str] = []
        self.stream: SlideStream | None = None
        self.batches: Iterator[dict] | None = None
        self.pushed_back: list[dict] = []

    def output_of(self, slide_id: str) -> Path:
        return self.out_dir / f"{slide_id}.h5"

    def plan(self, slides: Sequence[Path]) -> None:
        self.slides = [str(s) for s in slides]

    def prepare(self, slide_path: Path) -> PreparedSlide:
        slide_id = slide_id_of(slide_path)
        patches_path = self.patches_dir / f"{slide_id}.h5"
        if not patches_path.is_file():
            raise FormatError(f"{patches_path}: no patches file for slide {slide_path}; "
                              "run preprocessing for this slide first (make preprocess)")
        patches = read_patches(patches_path)
        plan = read_plan_of(patches, patches_path)
        with Slide(slide_path, mpp_override=patches.attrs.get("level0_mpp")) as slide:
            check_patches_fit(patches, patches_path, slide, plan)
            if not len(patches):
                raise FormatError(f"{patches_path}: 0 patches, so there is nothing to extract for {slide_path}; "
                                  "a slide needs tissue: check its thumbnail and re-run preprocessing for it")
            return PreparedSlide(patches, choose_reader(slide, plan, self.cfg.reader))

    @property
    def encoder_attrs(self) -> dict:
        """What a features file says about the encoder that made it (beside the patches file's attrs)."""
        return {"encoder": self.encoder.name, "embed_dim": self.encoder.embed_dim,
                "weights_sha256": self.encoder.weights_sha256, "encoder_input_size": self.encoder.input_size}

    def check_resumable(self, slides: Sequence[Path]) -> None:
        """Raise ConfigError if finished feature files of `slides` (which a resumed run skips) were made with
        another encoder, weights, input size or read plan than this run would use: one folder, one kind of features.
        """
        check_resumable(self.out_dir, map(slide_id_of, slides), self.output_of,
                        lambda slide_id, _: {**self.encoder_attrs, **self.plan_attrs(slide_id)}, "feature files")

    def plan_attrs(self, slide_id: str) -> dict:
        """The read-plan attrs of the slide's current patches file ({} if it has none that can be read)."""
        try:
            attrs = read_attrs(self.patches_dir / f"{slide_id}.h5")
        except FormatError:
            return {}
        return {key: attrs[key] for key in PLAN_ATTRS if key in attrs}

    def __call__(self, slide_path: Path) -> int:
        ready, features = self.extract(slide_path)
        attrs = {**ready.patches.attrs, **self.encoder_attrs}
        grid = FeatureGrid(ready.patches.coords, ready.patches.grid, attrs, features=self.to_storage(features, slide_path))
        write_features(self.output_of(slide_id_of(slide_path)), grid)
        return len(grid)

    def to_storage(self, features: np.ndarray, slide_path: Path) -> np.ndarray:
        dtype = FEATURE_DTYPES[self.cfg.features_dtype]
        with np.errstate(over="ignore"):  # an overflow is reported just below, as the slide's error
            stored = features.astype(dtype)
        if not np.isfinite(stored).all():
            raise SlideError(f"{slide_path}: features are not finite as {self.cfg.features_dtype} "
                             f"(largest |value| {np.abs(features).max():.3g}); set features_dtype=float32")
        return stored

    # -- the stream of cells ----------------------------------------------------------------------
    def start(self, slide: str) -> None:
        """(Re)start the stream at `slide`, followed by the planned slides after it."""
        rest = self.slides[self.slides.index(slide):] if slide in self.slides else [slide]
        self.stream = SlideStream(rest, self.prepare, int(self.cfg.loader_batch_size), self.encoder.input_size)
        loader = make_loader(self.stream, self.num_workers, self.device.type == "cuda", int(self.cfg.prefetch_factor))
        self.batches, self.pushed_back = iter(loader), []

    def next_batch(self) -> dict | None:
        if self.pushed_back:
            return self.pushed_back.pop()
        return next(self.batches, None)

    def slide_batches(self, slide_path: Path) -> tuple[PreparedSlide, Iterator[dict]]:
        """What preparing `slide_path` gave, and an iterator over its batches (raises its preparation error)."""
        slide = str(slide_path)
        if self.stream is None or slide not in self.stream.position:
            self.start(slide)
        position = self.stream.position[slide]
        while slide not in self.stream.prepared:  # the sampler has not reached it: pull until it has
            batch = self.next_batch()
            if batch is None:  # the sampler is done: it prepared every slide, and the last ones gave no cells
                break
            if self.stream.position[batch["slide"]] >= position:
                self.pushed_back.append(batch)
                break
        if slide not in self.stream.prepared:
            raise RuntimeError(f"{slide}: the stream of cells ended before this slide")
        ready = self.stream.prepared.pop(slide)
        if isinstance(ready, Exception):
            raise ready

        def batches() -> Iterator[dict]:
            done = 0
            while done < len(ready.patches):
                batch = self.next_batch()
                if batch is None:
                    raise RuntimeError(f"{slide}: the stream of cells ended {len(ready.patches) - done} cells early")
                if batch["slide"] != slide:  # left over from a slide that failed before its end
                    if self.stream.position[batch["slide"]] > position:
                        raise RuntimeError(f"{slide}: cells of {batch['slide']} arrived before this slide's")
                    continue
                done += len(batch["index"])
                yield batch

        return ready, batches()

    def extract(self, slide_path: Path) -> tuple[PreparedSlide, np.ndarray]:
        """The slide's prepared patches and its (N, embed_dim) float32 features, row i for coords[i].

        Workers deliver small batches (loader_batch_size) that are gathered on the device into model
        batches of batch_size.
        """
        try:
            ready, batches = self.slide_batches(slide_path)
            n = len(ready.patches)
            out = torch.full((n, self.encoder.embed_dim), float("nan"), device=self.device)
            gather = BatchGatherer(int(self.cfg.batch_size), lambda x, rows: out.index_copy_(0, rows, self.forward(x)))
            with tqdm(total=n, desc=slide_id_of(slide_path), unit="patch", leave=False, disable=n == 0) as bar:
                for batch in batches:
                    if batch["error"]:
                        raise SlideError(f"{slide_path}: {batch['error'][0]} "
                                         f"({len(batch['error'])} unreadable cell(s) in this batch)")
                    gather.add(batch["image"].to(self.device, non_blocking=True),
                               batch["index"].to(self.device, non_blocking=True))
                    bar.update(len(batch["index"]))
                gather.flush(last=True)
        except (SlideError, FormatError):
            raise  # the stream goes on with the next slide
        except BaseException:
            self.close()  # a broken loader (a worker died, an interrupt): the next slide restarts the stream
            raise
        result = out.cpu().numpy()
        if np.isnan(result).all(axis=1).any():
            raise RuntimeError(f"{slide_path}: {int(np.isnan(result).all(axis=1).sum())} rows were never written")
        return ready, result

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder.preprocess(images.to(self.device, non_blocking=True))
        n, size = len(x), int(self.cfg.batch_size)
        if self.cfg.compile and n < size:  # one static shape for the compiled graph
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        precision = PRECISIONS[self.cfg.precision]
        with torch.autocast(self.device.type, dtype=precision, enabled=precision is not None and self.device.type == "cuda"):
            return self.model(x)[:n].float()

    @property
    def num_workers(self) -> int:
        if self.cfg.num_workers != "auto":
            return int(self.cfg.num_workers)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        return max(0, available_cpus() // local_world - 1)

    def close(self) -> None:
        self.stream = self.batches = None  # drops the loader's iterator and with it the worker processes
        self.pushed_back = []


class BatchGatherer:
    """Gathers small batches of images (and their row indices) into model batches of `size` rows."""

    def __init__(self, size: int, encode: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
        self.size, self.encode = size, encode
        self.images: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def add(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        self.images.append(images), self.rows.append(rows)
        self.count += len(rows)
        if self.count >= self.size:
            self.flush()

    def flush(self, last: bool = False) -> None:
        """Encode the whole model batches gathered so far (and the remainder too, at the slide's end)."""
        if not self.images:
            return
        x, rows = torch.cat(self.images), torch.cat(self.rows)
        cut = len(x) if last else len(x) - len(x) % self.size
        for start in range(0, cut, self.size):
            self.encode(x[start:start + self.size], rows[start:start + self.size])
        self.images, self.rows = ([x[cut:]], [rows[cut:]]) if cut < len(x) else ([], [])
        self.count = len(x) - cut


# -- the run: sharding across torchrun ranks (stage.Shard) ---------------------------------------
def pick_device(name: str, shard: Shard) -> torch.device:
    """`auto`: this rank's GPU if there is one, else the CPU; a bare `cuda` also means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", shard.local_rank) if device.type == "cuda" and device.index is None else device


def build_encoder(cfg: DictConfig) -> Encoder:
    encoder_cfg = OmegaConf.to_container(cfg.encoder, resolve=True)
    return create_encoder(encoder_cfg.pop("name"), **encoder_cfg)


def run(cfg: DictConfig, encoder: Encoder | None = None) -> list[Outcome]:
    """Extract features for every slide of cfg.slides (this rank's shard) into cfg.out/<encoder>/.

    `encoder` (built from cfg.encoder when not given) lets a caller that already holds it skip the rebuild.
    Raises ConfigError (bad settings, or finished files made with other settings) before any slide.
    """
    check_run_settings(cfg)
    shard = Shard.from_env()
    slides = list_slides(cfg.slides)
    check_unique_ids(slides)  # all of them, before sharding: two ids may land on two ranks
    warn_patches_without_slide(Path(cfg.patches), slides)
    encoder = encoder or build_encoder(cfg)
    device = pick_device(cfg.device, shard)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out) / encoder.name
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = Extractor(encoder, Path(cfg.patches), out_dir, cfg, device)
    if not cfg.overwrite:
        extractor.check_resumable(slides)  # every rank checks the whole folder, so none starts mixing
    sources = shard.take(slides)
    log.info("rank %d/%d: %d slides, encoder %s (%d-d, input %d px) on %s", shard.rank, shard.world_size,
             len(sources), encoder.name, encoder.embed_dim, encoder.input_size, device)
    start = time.perf_counter()
    try:
        with shard.manifest(out_dir) as manifest:
            outcomes = run_per_slide(sources, extractor, extractor.output_of, manifest,
                                     overwrite=cfg.overwrite, desc=f"extract {encoder.name}", plan=extractor.plan)
    finally:
        extractor.close()
    done = [o for o in outcomes if o.status == "ok"]
    seconds = time.perf_counter() - start
    log.info("rank %d: %d slides extracted, %d patches in %.1f s (%.0f patches/s)", shard.rank, len(done),
             sum(o.n_patches for o in done), seconds, sum(o.n_patches for o in done) / max(seconds, 1e-9))
    return outcomes


def warn_patches_without_slide(patches_dir: Path, slides: Sequence[Path]) -> None:
    """Patches files whose slide is not in the slides folder are not extracted: say so, with their count."""
    ids = {slide_id_of(s) for s in slides}
    orphans = sorted(p.stem for p in patches_dir.glob("*.h5") if p.stem not in ids)
    if orphans:
        log.warning("%s: %d patches file(s) have no slide in the slides folder and are not extracted: %s%s",
                    patches_dir, len(orphans), ", ".join(orphans[:5]), ", ..." if len(orphans) > 5 else "")


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/extract.yaml with command-line style overrides, as the Hydra app would see it."""
    return compose_app("extract", overrides)


@hydra.main(config_path=str(CONFIG_DIR), config_name="extract", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        outcomes = run(cfg)
    except (ConfigError, WeightsError, SlideError, KeyError) as err:  # a bad config or folder: one clear line
        log.error("%s", err)
        raise SystemExit(2) from None
    if outcomes and all(o.status == "failed" for o in outcomes):
        log.error("all %d slides failed (reasons above and in the manifest under %s)", len(outcomes), cfg.out)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
