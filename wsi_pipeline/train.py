"""Train and evaluate one MIL model on one fold of one task (Hydra app); folds are a multirun.

    python -m wsi_pipeline.train task=panda model=mamba2d features=out/features/uni fold=0
    python -m wsi_pipeline.train -m task=panda model=mamba2d features=... fold=0,1,2,3,4

Writes, under `run_dir` (default runs/<task>/<model>): config.yaml, fold_<k>/{config.yaml, model.pt,
metrics.json, predictions_val.csv, predictions_test.csv, attention_test.h5} and summary.csv (rebuilt from the fold
dirs present after every fold, so a sweep resumes: finished folds are skipped unless overwrite=true).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import data
from .config import CONFIG_DIR, compose_app
from .data import Bag, DataError, FeatureBags, Task
from .h5io import FormatError, atomic_path, file_lock, read_attrs
from .losses import cross_entropy, nll_survival
from .metrics import compute_metrics
from .models import create_model, survival_from_logits
from .run_dir import CONFIG, FOLD_KEYS, differing_folds, fold_config, stale_folds

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training diverged; the message says where and which checkpoint is the last good one."""


class NonFiniteOutput(RuntimeError):
    """The model's output on a validation or test slide is NaN or infinite (that slide's features, most often)."""


class RunDirMismatch(RuntimeError):
    """The run dir holds folds trained with another configuration."""


# ------------------------------------------------------------------------------------- per-task behaviour


def _classification_loss(logits: torch.Tensor, bag: Bag, task: Task) -> torch.Tensor:
    return cross_entropy(logits[None], bag.target["label"][None])


def _survival_loss(logits: torch.Tensor, bag: Bag, task: Task) -> torch.Tensor:
    return nll_survival(logits[None], bag.target["bin"][None], bag.target["censorship"][None], task.alpha)


def _classification_columns(logits: torch.Tensor) -> dict[str, float]:
    prob = torch.softmax(logits.float(), dim=-1)
    return {"pred": int(prob.argmax()), **{f"prob_{c}": float(p) for c, p in enumerate(prob)}}


def _survival_columns(logits: torch.Tensor) -> dict[str, float]:
    _, surv, risk = survival_from_logits(logits.float())
    return {"risk": float(risk), **{f"surv_{k}": float(s) for k, s in enumerate(surv)}}


LOSSES = {"classification": _classification_loss, "survival": _survival_loss}
OUTPUT_COLUMNS = {"classification": _classification_columns, "survival": _survival_columns}
ID_COLUMNS = {"classification": ["case_id", "slide_id", "label"],
              "survival": ["case_id", "slide_id", "survival_months", "censorship"]}


# ------------------------------------------------------------------------------------- training loop


@dataclass
class TrainSettings:
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 1e-2
    amp: bool = True  # bf16 autocast, on CUDA only
    seed: int = 0
    device: str = "cpu"  # resolved: configs/train.yaml's `auto` is cuda when there is one (`_settings`)
    workers: int = 2  # processes reading feature files ahead of the GPU (0: read in the training loop)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(settings: TrainSettings) -> contextlib.AbstractContextManager:
    if settings.amp and settings.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward(model: torch.nn.Module, bag: Bag, settings: TrainSettings):
    with _autocast(settings):
        # the grid stays on the host: models derive their lattice shapes from it without a device sync; what they
        # derive on the host (`grid_prep`) the data loader's workers have prepared
        return model(bag.features.to(settings.device, non_blocking=True).float(), bag.grid, bag.prepared)


class _ReadErrors(Dataset):
    """The bags, a bad slide file's error (DataError, FormatError: the message names the file) returned rather than
    raised: so it reaches the main process as itself. Raised in a DataLoader worker, PyTorch re-raises it with the
    worker's traceback pasted into its message, and the trainer's one-line error would print that traceback."""

    def __init__(self, bags: FeatureBags):
        self.bags = bags

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> Bag | DataError | FormatError:
        try:
            return self.bags[i]
        except (DataError, FormatError) as err:
            return err


def _bags_in(bags: FeatureBags, order: list[int], settings: TrainSettings) -> Iterator[Bag]:
    """Slides one at a time in `order`, read ahead by `settings.workers` processes (in pinned memory on CUDA); a bad
    slide file raises its error."""
    loader = DataLoader(_ReadErrors(bags), batch_size=None, sampler=order, num_workers=settings.workers,
                        collate_fn=_as_is, pin_memory=torch.device(settings.device).type == "cuda")
    for bag in loader:
        if isinstance(bag, Exception):
            raise bag
        yield bag


def _as_is(bag: Bag) -> Bag:  # module level, so spawned workers can unpickle it
    return bag


def train_epoch(model, bags: FeatureBags, task: Task, optimizer, settings: TrainSettings, epoch: int,
                last_good: str) -> float:
    """One pass over the training slides in a seeded order; raises NonFiniteLoss at the first NaN/inf loss."""
    model.train()
    order = np.random.default_rng(settings.seed * 1000 + epoch).permutation(len(bags)).tolist()
    losses = []
    loader = _bags_in(bags, order, settings)
    for step, bag in enumerate(tqdm(loader, total=len(order), desc=f"epoch {epoch}", leave=False, disable=None)):
        out = _forward(model, bag, settings)
        loss = LOSSES[task.type](out.logits, _to(bag, settings.device), task)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} on slide {bag.slide_id} at epoch {epoch}, step {step}; "
                                f"training stopped. Last good checkpoint: {last_good}. Check that slide's "
                                "features or lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def _to(bag: Bag, device: str) -> Bag:
    return replace(bag, target={k: v.to(device) for k, v in bag.target.items()})


@torch.no_grad()
def predict(model, bags: FeatureBags, task: Task, settings: TrainSettings, where: str) -> tuple[pd.DataFrame, dict]:
    """DESIGN.md predictions table of a split, and each slide's attention (N,) float32. A non-finite output raises
    NonFiniteOutput naming the slide and `where` (the split, the epoch): not NaN probabilities scored as a class."""
    model.eval()
    rows, attention = [], {}
    for i, bag in enumerate(_bags_in(bags, list(range(len(bags))), settings)):
        out = _forward(model, bag, settings)
        if not torch.isfinite(out.logits).all():
            raise NonFiniteOutput(f"the model's output is not finite on slide {bag.slide_id} ({where}); stopped. "
                                  f"Check that slide's features ({bags.frame.path[i]}): NaN or inf values there "
                                  "are the usual cause")
        ids = bags.frame.iloc[i][ID_COLUMNS[task.type]].to_dict()
        rows.append({**ids, **OUTPUT_COLUMNS[task.type](out.logits)})
        attention[bag.slide_id] = out.attention.float().cpu().numpy().astype(np.float32)
    return pd.DataFrame(rows), attention


def _score(metrics: dict[str, float], monitor: str) -> float:
    value = metrics[monitor]
    return -math.inf if value is None or math.isnan(value) else value


def make_optimizer(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW; on CUDA its fused kernel (one launch for all parameters: the same update, and a visible share of
    a step for small MIL models, whose step time is mostly launches)."""
    params = list(params)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def fit(model, train: FeatureBags, val: FeatureBags, task: Task, settings: TrainSettings,
        checkpoint: Path | None = None, extra: dict | None = None) -> dict:
    """AdamW + cosine schedule; keeps the weights of the best validation `task.monitor` (the later epoch on ties:
    a saturated metric such as AUC 1.0 on a small validation split should not freeze the model at its first
    epoch) in memory and, when `checkpoint` is given, on disk. With a checkpoint, the training state is also saved
    after every epoch (`resume.pt` beside it), so a killed fold goes on from its last finished epoch; the caller
    removes it once the fold's results are written. Returns {best_epoch, val metrics, train losses}."""
    model.to(settings.device)
    optimizer = make_optimizer(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.epochs, 1))
    best = {"score": -math.inf, "epoch": -1, "state": None, "val": {}}
    history: list[float] = []
    resume = checkpoint.with_name(RESUME_NAME) if checkpoint is not None else None
    start = 0
    if resume is not None and resume.is_file():
        start, best, history = _load_resume(resume, model, optimizer, scheduler)
        log.info("%s: resuming after epoch %d of %d", resume, start - 1, settings.epochs)
    for epoch in range(start, settings.epochs):
        last_good = str(checkpoint) if best["state"] is not None and checkpoint else "none yet"
        history.append(train_epoch(model, train, task, optimizer, settings, epoch, last_good))
        scheduler.step()
        val_frame = predict(model, val, task, settings, f"val split, epoch {epoch}")[0]
        val_metrics = compute_metrics(task.metrics, val_frame)
        log.info("epoch %d: train loss %.4f, val %s", epoch, history[-1], _fmt(val_metrics))
        if best["state"] is None or _score(val_metrics, task.monitor) >= best["score"]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"score": _score(val_metrics, task.monitor), "epoch": epoch, "state": state, "val": val_metrics}
            if checkpoint is not None:
                save_checkpoint(checkpoint, state, {**(extra or {}), "epoch": epoch})
        if resume is not None:
            _save_resume(resume, epoch, model, optimizer, scheduler, best, history)
    if best["score"] == -math.inf and settings.epochs > 0:
        log.warning("the validation %s was not a number at any epoch (a validation split of one class, or without "
                    "events?): the model of the last epoch is kept, not the best one", task.monitor)
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "val": best["val"], "train_loss": history}


RESUME_NAME = "resume.pt"


def _save_resume(path: Path, epoch: int, model, optimizer, scheduler, best: dict, history: list[float]) -> None:
    """Everything the next epoch depends on: weights, optimiser and schedule, the best so far, the RNG."""
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "best": best, "history": history,
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_resume(path: Path, model, optimizer, scheduler) -> tuple[int, dict, list[float]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file means: start the fold afresh
        log.warning("%s: unreadable (%s); training this fold from the start", path, err)
        return 0, {"score": -math.inf, "epoch": -1, "state": None, "val": {}}, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"] + 1, state["best"], state["history"]


def save_checkpoint(path: Path, state: dict, meta: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, **meta}, tmp)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------- one fold on disk


def _check_run_config(cfg: DictConfig, run_dir: Path, fold_dir: Path) -> dict:
    """config.yaml records the run's settings (the features dir included), fold_<k>/config.yaml each fold's own. A
    fold trains only with the settings the run dir's trained folds had (but for run_dir.UNCOMPARED_KEYS), unless
    overwrite=true retrains it: the folds trained otherwise are then stale, left out of summary.csv and the report
    until they are retrained too. Returns the settings to record."""
    current = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in FOLD_KEYS}
    run_config = run_dir / CONFIG
    previous = OmegaConf.to_container(OmegaConf.load(run_config)) if run_config.is_file() else None

    def recorded_of(path: Path) -> dict | None:
        recorded = fold_config(path)
        if recorded is None and previous is not None:  # trained before folds recorded their own settings
            _write_config(path / CONFIG, previous)
            return previous
        return recorded

    conflicts = {path.name: keys for path, keys in differing_folds(run_dir, current, recorded_of).items()}
    if conflicts and not cfg.overwrite:
        raise RunDirMismatch(f"{run_dir}: {', '.join(sorted(conflicts))} trained with other values of "
                             f"{sorted(set().union(*conflicts.values()))}; use another run_dir=, or overwrite=true to "
                             "retrain")
    others = sorted(name for name in conflicts if name != fold_dir.name)
    if others:
        log.warning("%s: %s trained with other settings: left out of summary.csv and the report until retrained "
                    "with these (overwrite=true)", run_dir, ", ".join(others))
    _write_config(run_config, current)
    return current


def _write_config(path: Path, values: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(values)))


def _write_attention(path: Path, attention: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for slide_id, weights in attention.items():
            f.create_dataset(slide_id, data=weights.astype(np.float32))


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def load_fold_data(cfg: DictConfig, task: Task) -> tuple[dict[str, FeatureBags], np.ndarray | None]:
    labels = data.read_labels(task)
    splits = data.read_split(task, int(cfg.fold), labels, data.attach_features(labels, cfg.features, cfg.missing))
    bins = data.survival_bins(splits["train"], task.n_bins) if task.type == "survival" else None
    return {name: FeatureBags(frame, task, bins, cache=cfg.train.cache) for name, frame in splits.items()}, bins


def run_fold(cfg: DictConfig) -> dict | None:
    """Train and evaluate fold `cfg.fold`; None when it was already finished (resume)."""
    if OmegaConf.is_missing(cfg, "features"):
        raise DataError("features= is required: the folder of <slide_id>.h5 feature files (features/<encoder>/)")
    task = Task.from_config(OmegaConf.to_container(cfg.task, resolve=True))
    run_dir = Path(cfg.run_dir)
    fold_dir = run_dir / f"fold_{cfg.fold}"
    settings_record = _check_run_config(cfg, run_dir, fold_dir)
    if (fold_dir / "metrics.json").is_file() and not cfg.overwrite:
        log.info("%s: finished already, skipped (overwrite=true redoes it)", fold_dir)
        write_summary(run_dir)
        return None
    (fold_dir / "metrics.json").unlink(missing_ok=True)
    if cfg.overwrite:
        (fold_dir / RESUME_NAME).unlink(missing_ok=True)  # retrain from the start, not from a killed run
    splits, bins = load_fold_data(cfg, task)
    in_dim = int(read_attrs(splits["train"].frame.path[0]).get("embed_dim") or splits["train"][0].features.shape[1])
    settings = _settings(cfg)
    seed_everything(settings.seed)
    model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = create_model(cfg.model.name, in_dim=in_dim, n_classes=task.n_outputs, **model_cfg)
    for bags in splits.values():
        bags.prepare = model.grid_prep
    meta = {"model": cfg.model.name, "model_cfg": model_cfg, "in_dim": in_dim, "n_classes": task.n_outputs,
            "task": task.name, "bins": None if bins is None else bins.tolist()}
    _write_config(fold_dir / CONFIG, settings_record)  # before any checkpoint: they were trained with these
    result = fit(model, splits["train"], splits["val"], task, settings, fold_dir / "model.pt", meta)
    metrics = _evaluate(model, splits, task, settings, fold_dir, result, run_dir)
    (fold_dir / RESUME_NAME).unlink(missing_ok=True)  # only now: a kill during the evaluation keeps the training
    return metrics


def _settings(cfg: DictConfig) -> TrainSettings:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t = cfg.train
    return TrainSettings(int(t.epochs), float(t.lr), float(t.weight_decay), bool(t.amp), int(cfg.seed), device,
                         int(t.workers))


def _evaluate(model, splits, task, settings, fold_dir: Path, result: dict, run_dir: Path) -> dict:
    metrics = {"best_epoch": result["best_epoch"], "train_loss": result["train_loss"]}
    for name in ("val", "test"):
        frame, attention = predict(model, splits[name], task, settings, f"{name} split, after training")
        _write_csv(fold_dir / f"predictions_{name}.csv", frame)
        metrics[name] = compute_metrics(task.metrics, frame)
        if name == "test":
            _write_attention(fold_dir / "attention_test.h5", attention)
    with atomic_path(fold_dir / "metrics.json") as tmp:  # written last: its presence marks the fold finished
        tmp.write_text(json.dumps(_json_numbers(metrics), indent=2, allow_nan=False))
    log.info("%s: test %s", fold_dir, _fmt(metrics["test"]))
    write_summary(run_dir)
    return metrics


def _json_numbers(value):
    """NaN and infinities as null: JSON has no NaN (json.dumps would write a bare NaN that other readers reject)."""
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_summary(run_dir: Path) -> pd.DataFrame:
    """summary.csv: each finished fold's test metrics, then mean and std rows (from the fold dirs present, but for
    stale ones: `run_dir.stale_folds`). Folds of a parallel sweep finish at any time: each rewrites the file under a
    lock, so the last to write has read every fold finished before it."""
    with file_lock(run_dir / ".summary.lock"):
        stale = stale_folds(run_dir)
        rows = {}
        for path in sorted(run_dir.glob("fold_*/metrics.json")):
            if path.parent not in stale:
                rows[int(path.parent.name.split("_")[1])] = json.loads(path.read_text())["test"]
        return _write_summary_table(run_dir, rows)


def _write_summary_table(run_dir: Path, rows: dict) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index").astype(float).sort_index()  # null (NaN) metrics: NaN
    table.index = table.index.astype(str)
    if len(table):
        stats = pd.DataFrame({"mean": table.mean(), "std": table.std(ddof=0)}).T
        table = pd.concat([table, stats])
    table.index.name = "fold"
    with atomic_path(run_dir / "summary.csv") as tmp:
        table.to_csv(tmp)
    return table


# ------------------------------------------------------------------------------------- the app


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/train.yaml with command-line style overrides, as the Hydra app would see it."""
    return compose_app("train", overrides)


EXPECTED_ERRORS = (DataError, FormatError, NonFiniteLoss, NonFiniteOutput, RunDirMismatch)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run_fold(cfg)
    except EXPECTED_ERRORS as err:  # bad input: one clear line, not a traceback
        log.error("%s", err)  # to the console and the fold's train.log
        sys.exit(1)


if __name__ == "__main__":
    main()
