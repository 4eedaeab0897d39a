"""Run one stage over many slides: skip finished outputs, isolate failures, keep the manifest current.

Every per-slide stage (preprocess, extract) goes through `run_per_slide`, so resume, progress and
failure handling behave the same everywhere. A slide's work function returns its patch count and
raises an exception with a clear message when the slide cannot be processed.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
from tqdm.auto import tqdm

from .h5io import FormatError, Manifest
from .slide import SlideError, slide_id_of

log = logging.getLogger(__name__)

# Errors that mean "this slide is bad", reported in one line; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (SlideError, FormatError)


@dataclass(frozen=True)
class Outcome:
    slide_id: str
    status: str
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""


def rows_in(path: Path, dataset: str = "coords") -> int:
    with h5py.File(path, "r") as f:
        return len(f[dataset])


def finished_rows(path: Path, dataset: str = "coords") -> int | None:
    """The row count of a finished output; None if there is none, or if it cannot be read (to be redone)."""
    if not path.is_file():
        return None
    try:
        return rows_in(path, dataset)
    except (OSError, KeyError, TypeError) as err:  # not HDF5, truncated, no such dataset
        log.warning("%s: an existing output that cannot be read (%s); redoing its slide", path, err)
        return None


def _run_one(work: Callable[[Path], int], source: Path) -> Outcome:
    slide_id = slide_id_of(source)
    start = time.perf_counter()
    try:
        n = work(source)
        return Outcome(slide_id, "ok", n, time.perf_counter() - start)
    except EXPECTED_ERRORS as err:
        return Outcome(slide_id, "failed", 0, time.perf_counter() - start, str(err))
    except Exception as err:  # noqa: BLE001 - one bad slide must not end a run over thousands
        log.exception("%s: unexpected error", source)
        return Outcome(slide_id, "failed", 0, time.perf_counter() - start, f"{type(err).__name__}: {err}")


def check_unique_ids(sources: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for source in sources:
        sid = slide_id_of(source)
        if sid in seen:
            raise SlideError(f"two slides share the id {sid!r}: {seen[sid]} and {source}; slide ids must be unique")
        seen[sid] = source


def run_per_slide(
    sources: Sequence[Path],
    work: Callable[[Path], int],
    output_of: Callable[[str], Path],
    manifest: Manifest,
    *,
    overwrite: bool = False,
    workers: int = 1,
    desc: str = "slides",
    plan: Callable[[list[Path]], None] | None = None,
) -> list[Outcome]:
    """Apply `work` to every source whose output is missing or unreadable (or to all, with `overwrite`).

    `work` must be picklable when `workers > 1` (a module-level function or a functools.partial of one).
    `plan`, if given, is told the sources to do, in order, before any work (extraction streams them).
    """
    sources = [Path(s) for s in sources]
    check_unique_ids(sources)
    outcomes: list[Outcome] = []
    todo: list[Path] = []
    for source in sources:
        sid = slide_id_of(source)
        rows = None if overwrite else finished_rows(output_of(sid))
        if rows is not None:
            outcome = Outcome(sid, "skipped", rows)
            manifest.record(sid, source, outcome.status, outcome.n_patches)
            outcomes.append(outcome)
        else:
            todo.append(source)
    if len(outcomes):
        log.info("%d of %d slides already done (skipped; overwrite=true redoes them)", len(outcomes), len(sources))
    if plan is not None:
        plan(todo)

    def finish(source: Path, outcome: Outcome) -> None:
        manifest.record(outcome.slide_id, source, outcome.status, outcome.n_patches, outcome.seconds, outcome.error)
        if outcome.status == "failed":
            log.error("%s", outcome.error)
        outcomes.append(outcome)

    bar = tqdm(total=len(todo), desc=desc, unit="slide", disable=not todo)
    if workers <= 1 or len(todo) <= 1:
        for source in todo:
            finish(source, _run_one(work, source))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_run_one, work, source): source for source in todo}
            for future in as_completed(futures):
                finish(futures[future], future.result())
                bar.update()
    bar.close()
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        log.warning("%d of %d slides failed; see %s", failed, len(sources), manifest.path)
    return outcomes
