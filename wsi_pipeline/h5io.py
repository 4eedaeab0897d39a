"""The files between stages (see docs/formats.md): patch grids, feature grids, manifests; atomic writes.

A file appears under its final name only once it is complete: it is written as `<name>.<host>-<pid>-<random>.tmp`
and renamed, so a killed run never leaves a half-written file where a finished one is expected, and processes writing
the same file at once (the folds of a sweep, each rewriting summary.csv) do not share a temporary file.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd

FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
MANIFEST_COLUMNS = ["slide_id", "source", "status", "n_patches", "seconds", "error"]


class FormatError(RuntimeError):
    """A stage file is missing something the format requires; the message names the file."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, private to this process; rename it to `path` only if the block
    succeeds, its bytes flushed to disk first (a power cut leaves the old file or the new one, not an empty one).
    Temporary files that killed processes of this host left in `path`'s folder are removed the first time this
    process writes there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = path.with_name(f"{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if need be) for the block: processes that read, then rewrite one
    shared file (summary.csv after each fold of a parallel sweep) take turns, so none writes a stale one last.
    With wait=False a lock another process (or another open of the file) holds raises BlockingIOError at once.
    The system drops the lock of a process that dies, however it dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a file system that cannot sync one
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


_HOST = socket.gethostname().replace("/", "_")


_SWEPT: set[Path] = set()  # folders this process has cleared of dead processes' temporary files


def _remove_leftovers(path: Path) -> None:
    """This host's temporary files in `path`'s folder whose process is gone (other hosts' may be live: a shared
    disk). The folder is listed once per process, not per write: a stage writes thousands of files into one folder,
    and listing it for each would make a run quadratic in its slides."""
    path.with_name(path.name + TMP_SUFFIX).unlink(missing_ok=True)  # the name used before pids were added
    folder = path.parent
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    marker = f".{_HOST}-"
    for tmp in folder.glob(f"*{glob.escape(marker)}*{TMP_SUFFIX}"):
        pid = tmp.name.rsplit(marker, 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _attr(value):
    """h5py attrs: strings stay strings, sequences become arrays, numpy scalars become Python ones."""
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _py(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class PatchGrid:
    """A slide's patches on its lattice: level-0 (x, y) `coords`, lattice (row, col) `grid`, and attrs."""

    coords: np.ndarray  # int64 (N, 2)
    grid: np.ndarray  # int32 (N, 2)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.grid = np.asarray(self.grid, dtype=np.int32).reshape(-1, 2)
        if len(self.coords) != len(self.grid):
            raise ValueError(f"coords ({len(self.coords)}) and grid ({len(self.grid)}) differ in length")

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class FeatureGrid(PatchGrid):
    """Features row-aligned with a PatchGrid: `features[i]` belongs to `coords[i]` and `grid[i]`."""

    features: np.ndarray = None  # (N, D) float16 | float32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features is None or len(self.features) != len(self.coords):
            n = None if self.features is None else len(self.features)
            raise ValueError(f"features ({n} rows) must be row-aligned with coords ({len(self.coords)})")


def write_patches(path: str | Path, patches: PatchGrid) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=patches.coords)
        f.create_dataset("grid", data=patches.grid)
        for key, value in {**patches.attrs, "format_version": FORMAT_VERSION}.items():
            f.attrs[key] = _attr(value)


def write_features(path: str | Path, grid: FeatureGrid) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=grid.features, chunks=True)
        f.create_dataset("coords", data=grid.coords)
        f.create_dataset("grid", data=grid.grid)
        for key, value in {**grid.attrs, "format_version": FORMAT_VERSION}.items():
            f.attrs[key] = _attr(value)


def _open(path: str | Path, required: tuple[str, ...]) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise FormatError(f"{path}: not a readable HDF5 file ({err}); delete it and re-run its stage") from err
    missing = [name for name in required if name not in f]
    if missing:
        f.close()
        raise FormatError(f"{path}: missing dataset(s) {missing}; was it written by this pipeline?")
    return f


def read_attrs(path: str | Path) -> dict:
    with _open(path, ()) as f:
        return {k: _py(v) for k, v in f.attrs.items()}


def read_patches(path: str | Path) -> PatchGrid:
    with _open(path, ("coords", "grid")) as f:
        return PatchGrid(f["coords"][:], f["grid"][:], {k: _py(v) for k, v in f.attrs.items()})


def read_features(path: str | Path) -> FeatureGrid:
    with _open(path, ("features", "coords", "grid")) as f:
        return FeatureGrid(
            f["coords"][:], f["grid"][:], {k: _py(v) for k, v in f.attrs.items()}, features=f["features"][:]
        )


class Manifest:
    """`manifest.csv` of a stage's output folder: one row per slide, rewritten atomically on each update."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            # ids and messages as text: a slide named 001, 1e5, TRUE or NA is not a number, a bool or missing
            text = {c: str for c in ("slide_id", "source", "status", "error")}
            for row in pd.read_csv(self.path, dtype=text, keep_default_na=False).to_dict("records"):
                self.rows[row["slide_id"]] = row

    def record(self, slide_id: str, source: str, status: str, n_patches: int = 0, seconds: float = 0.0,
               error: str = "", save: bool = True) -> None:
        """One slide's row, written to disk at once unless `save=False` (many rows in a row: one `save` after)."""
        if status not in ("ok", "failed", "skipped"):
            raise ValueError(f"status must be ok, failed or skipped, not {status!r}")
        self.rows[slide_id] = dict(slide_id=slide_id, source=str(source), status=status, n_patches=int(n_patches),
                                   seconds=round(float(seconds), 3), error=error)
        if save:
            self.save()

    def save(self) -> None:
        frame = pd.DataFrame(list(self.rows.values()), columns=MANIFEST_COLUMNS).sort_values("slide_id")
        with atomic_path(self.path) as tmp:
            frame.to_csv(tmp, index=False)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows.values()), columns=MANIFEST_COLUMNS)
