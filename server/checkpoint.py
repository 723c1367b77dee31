"""A run's checkpoint: after every round (round 0 included) the server writes checkpoint.npz into the run folder,
atomically, holding what the next round needs: the global weights, the round, the best model so far and the rounds
since it, the server optimiser's state (fedadam), the held-out rows kept after the overlap check and the Grad-CAM
sample, the last heatmaps (for drift), the learnt site names, round durations and the last history row. A resumed run
(run setting `resume`) loads it and goes on at the next round; the tables are cut back to the checkpointed round by
their recorder. One .npz (arrays only, no pickles, the state as JSON), so a file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import write_atomic
from common.config import RunConfig

CHECKPOINT = "checkpoint.npz"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, unreadable, or of another model; the message says which."""


@dataclass
class Checkpoint:
    """The state of a run after one round."""

    round: int
    identity: dict  # the model the weights belong to: architecture, labels, input, weight shapes (identity())
    weights: list[np.ndarray]  # the global model after this round
    best_weights: list[np.ndarray] = field(default_factory=list)  # the best model so far (empty: none yet)
    adam: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # the server optimiser's moments: fedadam's first and second, fedavgm's running sum and none
    heat: np.ndarray | None = None  # (n_labels, m, h, w) the last round's heatmaps, for drift
    state: dict = field(default_factory=dict)  # JSON: best, best_round, stale, durations, heldout_rows, sample_rows, sites, last_row


def identity(cfg: RunConfig, shapes: list[tuple[int, ...]]) -> dict:
    """What a checkpoint's weights must match to be loaded into this run's model."""
    return {"model": cfg.model, "labels": list(cfg.labels), "image_size": cfg.image_size, "channels": cfg.channels, "shapes": [list(s) for s in shapes]}


def _arrays(prefix: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays under numbered keys, for the .npz."""
    return {f"{prefix}{i}": a for i, a in enumerate(arrays)}


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint into the run folder, replacing the previous one only once it is whole on disk."""
    meta = {"format": FORMAT, "round": checkpoint.round, "identity": checkpoint.identity, "state": checkpoint.state}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), **_arrays("w", checkpoint.weights), **_arrays("best", checkpoint.best_weights)}
    if checkpoint.adam is not None:
        arrays |= _arrays("m", checkpoint.adam[0]) | _arrays("v", checkpoint.adam[1])
    if checkpoint.heat is not None:
        arrays["heat"] = checkpoint.heat
    return write_atomic(Path(folder) / CHECKPOINT, lambda p: np.savez(p, **arrays))


def _numbered(archive, prefix: str) -> list[np.ndarray]:
    """The arrays saved under prefix0, prefix1, ... in order."""
    count = sum(1 for k in archive.files if k.startswith(prefix) and k[len(prefix) :].isdigit())
    return [archive[f"{prefix}{i}"] for i in range(count)]


def load_checkpoint(folder: Path) -> Checkpoint:
    """The run folder's checkpoint; CheckpointError in one line where there is none or it does not read."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (the run wrote none: it stopped before round 0 ended, or predates checkpoints)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes())
            weights, best = _numbered(archive, "w"), _numbered(archive, "best")
            adam = (_numbered(archive, "m"), _numbered(archive, "v")) if "m0" in archive.files else None
            heat = archive["heat"] if "heat" in archive.files else None
        checkpoint = Checkpoint(int(meta["round"]), meta["identity"], weights, best, adam, heat, meta["state"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable fedimaging checkpoint ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    if [list(w.shape) for w in weights] != checkpoint.identity.get("shapes"):
        raise CheckpointError(f"{path}: its weights do not have the shapes it records (a damaged file)")
    return checkpoint


def require_model(checkpoint: Checkpoint, expected: dict, folder: Path) -> None:
    """CheckpointError in one line where the checkpoint holds another model than `expected` (identity() of this run;
    keys missing from expected are not compared)."""
    differ = [k for k in expected if checkpoint.identity.get(k) != expected[k]]
    if differ:
        said = "; ".join(f"{k}: checkpoint {checkpoint.identity.get(k)!r}, this run {expected[k]!r}" for k in differ if k != "shapes")
        raise CheckpointError(f"{Path(folder) / CHECKPOINT}: a checkpoint of another model ({said or 'its weight shapes differ'})")


def check_state(checkpoint: Checkpoint, n_heldout: int, folder: Path) -> None:
    """CheckpointError in one line where the checkpoint's state does not fit this run: held-out rows outside the
    held-out set, Grad-CAM rows outside those kept, or best weights and optimiser moments not of the model's shapes."""
    state, shapes = checkpoint.state, checkpoint.identity["shapes"]
    try:
        kept, sample = np.asarray(state["kept"], int), np.asarray(state["sample_rows"], int)
        problems = [
            ("held-out rows", kept.size and (kept.min() < 0 or kept.max() >= n_heldout or len(set(kept.tolist())) < kept.size)),
            ("Grad-CAM rows", sample.size and (sample.min() < 0 or sample.max() >= kept.size)),
            ("best weights", checkpoint.best_weights and [list(w.shape) for w in checkpoint.best_weights] != shapes),
            ("optimiser moments", checkpoint.adam is not None and any(arrays and [list(a.shape) for a in arrays] != shapes for arrays in checkpoint.adam)),
            ("round state", not all(isinstance(state[k], int) and state[k] >= 0 for k in ("stale", "dp_rounds"))),
        ]  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{Path(folder) / CHECKPOINT}: its state is incomplete ({type(exc).__name__}: {exc})") from None
    wrong = [name for name, bad in problems if bad]
    if wrong:
        raise CheckpointError(f"{Path(folder) / CHECKPOINT}: its {', '.join(wrong)} do not fit this run (a damaged or foreign file)")
