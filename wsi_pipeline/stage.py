"""Run one stage over many slides: skip finished outputs, isolate failures, keep the manifest current.

Every per-slide stage (preprocess, extract) goes through `run_per_slide`, so resume, progress and
failure handling behave the same everywhere. A slide's work function returns its patch count and
raises an exception with a clear message when the slide cannot be processed. `Shard` splits the
slides of one folder between processes (torchrun ranks, the tasks of a batch-job array), each with
its own manifest file that `merge_manifests` folds into `manifest.csv`; `check_resumable` stops a
resumed run whose finished outputs were made with other settings.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import h5py
from tqdm.auto import tqdm

from .config import ConfigError
from .h5io import FormatError, Manifest, file_lock, read_attrs
from .slide import SlideError, slide_id_of

log = logging.getLogger(__name__)

# Errors that mean "this slide is bad", reported in one line; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (SlideError, FormatError)
WORKER_DIED = "the worker process died (out of memory? a crash in a decoder?)"


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


# -- resuming only what this run would make -------------------------------------------------------
def _same_attr(have: object, want: object) -> bool:
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(have, want, rel_tol=1e-9)
    return have == want


def _shown(value: object) -> str:
    """An attr value for a message; a sha256 is cut to its first 12 digits."""
    text = str(value)
    return f"{text[:12]}..." if len(text) > 20 else text


def check_resumable(folder: Path, slide_ids: Iterable[str], output_of: Callable[[str], Path],
                    wanted: Callable[[str, dict], dict], kind: str) -> None:
    """Raise ConfigError if finished outputs of `slide_ids` (which a resumed run skips) have attrs other than
    `wanted(slide_id, attrs)`, this run's for that file: one folder holds one kind of `kind` (e.g. "feature
    files").

    Outputs that cannot be read are left to `run_per_slide`, which redoes them. An attr a file does not record (a
    file written before that setting was recorded) is not compared.
    """
    differences: Counter[tuple[str, str, str]] = Counter()  # (attr, file's value, this run's) -> files
    n_finished = n_different = 0
    for slide_id in slide_ids:
        try:
            have = read_attrs(output_of(slide_id))
        except FormatError:  # no file, or an unreadable one
            continue
        differ = [(key, _shown(have[key]), _shown(value)) for key, value in wanted(slide_id, have).items()
                  if key in have and not _same_attr(have[key], value)]
        differences.update(differ)
        n_finished, n_different = n_finished + 1, n_different + bool(differ)
    if differences:
        details = "; ".join(f"{key} {have} (this run: {want}) in {n} file(s)"
                            for (key, have, want), n in differences.items())
        raise ConfigError(
            f"{folder}: {n_different} of its {n_finished} finished {kind} were made with other settings than this "
            f"run's, and resuming would skip them and mix two kinds of {kind} in one folder: {details}. Write this "
            "run to another folder (out=ANOTHER_FOLDER), or redo those files with this run's settings (overwrite=true)")


# -- sharding one folder between processes --------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number") from None


@dataclass(frozen=True)
class Shard:
    """This process's share of the slides: rank `rank` of `world_size` processes (each its own manifest file)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            raise ConfigError(f"RANK={self.rank} WORLD_SIZE={self.world_size}: the rank must be 0 to WORLD_SIZE - 1 "
                              "and WORLD_SIZE at least 1 (a SLURM array: --array=0-<N-1>, "
                              "RANK=$SLURM_ARRAY_TASK_ID WORLD_SIZE=$SLURM_ARRAY_TASK_COUNT)")

    @classmethod
    def from_env(cls) -> "Shard":
        """RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun, or by hand); a plain run is rank 0 of 1."""
        return cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))

    @classmethod
    def of(cls, rank: int | None = None, world_size: int | None = None) -> "Shard":
        """The shard the settings name (`shard.rank` / `shard.world_size`: a Hydra sweep over the ranks, e.g. through
        the submitit launcher), where given; else the environment's (`from_env`)."""
        env = cls.from_env()
        if rank is None and world_size is None:
            return env
        return cls(env.rank if rank is None else int(rank), env.world_size if world_size is None else int(world_size),
                   env.local_rank)

    def take(self, sources: Sequence[Path]) -> list[Path]:
        """Every world_size-th slide of the sorted list, from rank: disjoint shards covering all slides."""
        return sorted(sources)[self.rank::self.world_size]

    def manifest_path(self, out_dir: Path) -> Path:
        if self.world_size == 1:
            return out_dir / "manifest.csv"
        return out_dir / f"manifest.rank{self.rank}-of-{self.world_size}.csv"

    @contextlib.contextmanager
    def manifest(self, out_dir: Path) -> Iterator[Manifest]:
        """This rank's manifest for the block. Sharded: its own file, started afresh (older rows live in
        manifest.csv) and folded into manifest.csv when the block ends, even by an error.

        The block holds a lock of this shard on `out_dir`: a second run of the same shard into the same folder (two
        unsharded runs, say, which would both do every slide) stops with a ConfigError before it writes anything.
        """
        path = self.manifest_path(out_dir)
        with self._lock(out_dir, path):
            if self.world_size > 1:
                path.unlink(missing_ok=True)
            try:
                yield Manifest(path)
            finally:
                if self.world_size > 1:
                    merge_manifests(out_dir, self.world_size)

    @contextlib.contextmanager
    def _lock(self, out_dir: Path, manifest: Path) -> Iterator[None]:
        lock, held = out_dir / f".run-{manifest.stem}.lock", contextlib.ExitStack()
        try:
            held.enter_context(file_lock(lock, wait=False))
        except BlockingIOError:
            which = "" if self.world_size == 1 else f" as shard {self.rank} of {self.world_size}"
            raise ConfigError(
                f"{out_dir}: another run is writing this folder{which} (it holds {lock}). Two runs of the same slides "
                "into one folder would each do every slide: wait for it to finish, or split the slides between "
                "runs with RANK=r WORLD_SIZE=n (as torchrun sets them; preprocessing also takes shard.rank=r "
                "shard.world_size=n)") from None
        with held:
            yield


def merge_manifests(out_dir: Path, world_size: int) -> Path:
    """Fold the ranks' manifests into manifest.csv, under a lock: the last rank to finish writes it complete."""
    merged = out_dir / "manifest.csv"
    with file_lock(out_dir / ".manifest.lock"):
        manifest = Manifest(merged)
        for rank in range(world_size):
            part = Shard(rank, world_size).manifest_path(out_dir)
            if part.is_file():
                manifest.rows.update(Manifest(part).rows)
        manifest.save()
    return merged


# -- the run --------------------------------------------------------------------------------------
def _pool_pass(pending: deque[Path], work: Callable[[Path], int], workers: int,
               finish: Callable[[Path, Outcome], None]) -> list[Path]:
    """Run the slides of `pending` (taken from its front) in one pool of `workers` processes, at most `workers`
    at a time, until none is left or a worker dies, which breaks the pool: return the slides then in flight."""
    running: dict[Future, Path] = {}
    lost: list[Path] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        while (pending or running) and not lost:
            try:
                while pending and len(running) < workers:
                    running[pool.submit(_run_one, work, pending[0])] = pending[0]
                    pending.popleft()
            except BrokenProcessPool:
                if not running:  # broken with no slide in it: not a slide's doing
                    raise
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                done, _ = wait(running)  # the pool is gone: every slide in it ends now, with or without a result
            for future in done:
                source = running.pop(future)
                if isinstance(future.exception(), BrokenProcessPool):
                    lost.append(source)
                else:
                    finish(source, future.result())
    return lost


def _run_in_pools(todo: Sequence[Path], work: Callable[[Path], int], workers: int,
                  finish: Callable[[Path, Outcome], None]) -> None:
    """Run `todo` in worker processes; a worker that dies (killed for memory, a segfault) fails its slide only.

    A dead worker breaks its pool. The slide in flight then is failed; if several were, each is run again alone
    in a fresh process, so only the one that kills its process is failed. Then a new pool goes on with the rest."""
    pending = deque(todo)
    while pending:
        lost = _pool_pass(pending, work, workers, finish)
        for source in lost:
            if len(lost) == 1 or _pool_pass(deque([source]), work, 1, finish):
                finish(source, Outcome(slide_id_of(source), "failed", error=f"{source}: {WORKER_DIED}"))


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
    outputs_of: Callable[[str], Sequence[Path]] | None = None,
) -> list[Outcome]:
    """Apply `work` to every source whose output is missing or unreadable (or to all, with `overwrite`).

    `work` must be picklable when `workers > 1` (a module-level function or a functools.partial of one); each
    slide then runs in a worker process, and one whose process dies is failed alone (`WORKER_DIED`).
    `plan`, if given, is told the sources to do, in order, before any work (extraction streams them).
    `outputs_of(slide_id)` lists every file the work writes for a slide (default: `output_of`'s): with
    `overwrite`, a slide that fails has them removed, so no output of the old settings outlives its redo.
    """
    sources = [Path(s) for s in sources]
    outputs_of = outputs_of or (lambda sid: [output_of(sid)])
    check_unique_ids(sources)
    outcomes: list[Outcome] = []
    todo: list[Path] = []
    for source in sources:
        sid = slide_id_of(source)
        rows = None if overwrite else finished_rows(output_of(sid))
        if rows is not None:
            outcome = Outcome(sid, "skipped", rows)
            manifest.record(sid, source, outcome.status, outcome.n_patches, save=False)
            outcomes.append(outcome)
        else:
            todo.append(source)
    if len(outcomes):
        manifest.save()  # once for every skipped slide: a rewrite per row made a resume quadratic in its slides
        log.info("%d of %d slides already done (skipped; overwrite=true redoes them)", len(outcomes), len(sources))
    if plan is not None:
        plan(todo)
    bar = tqdm(total=len(todo), desc=desc, unit="slide", disable=not todo)

    def finish(source: Path, outcome: Outcome) -> None:
        if outcome.status == "failed":
            log.error("%s", outcome.error)
            if overwrite:
                _remove_outputs(outcome.slide_id, outputs_of(outcome.slide_id))
        manifest.record(outcome.slide_id, source, outcome.status, outcome.n_patches, outcome.seconds, outcome.error)
        outcomes.append(outcome)
        bar.update()

    if workers <= 1:
        for source in todo:
            finish(source, _run_one(work, source))
    else:
        _run_in_pools(todo, work, workers, finish)
    bar.close()
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        log.warning("%d of %d slides failed; see %s", failed, len(sources), manifest.path)
    return outcomes


def _remove_outputs(slide_id: str, paths: Sequence[Path]) -> None:
    removed = [path for path in paths if path.is_file()]
    for path in removed:
        path.unlink()
    if removed:
        log.warning("%s: removed its outputs of an earlier run (overwrite=true, and it failed now): %s",
                    slide_id, ", ".join(map(str, removed)))
