"""Experiment tracking: the trainer's logged records sent to a tracker as they are made.

`TrainConfig.tracking` picks it: "none" (the history in crosscoder.json only) or
"tensorboard" (event files in `<run>/tensorboard`, read by `tensorboard --logdir`; needs
the `tracking` extra). Every numeric field of a record becomes a scalar under its own
name, at the record's step; only the main rank of a `torchrun` job writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from engine.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'modeldiff[tracking]' (or pip install tensorboard)"


class TrackingError(ConfigError):
    """The tracker the config names cannot be used."""


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    """Tracking off."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars to TensorBoard event files."""

    def __init__(
        self, log_dir: Path, config: dict[str, Any] | None = None, first_step: int = 0
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is missing
            raise TrackingError(f"tracking = 'tensorboard' needs TensorBoard: {INSTALL}") from None
        # A resumed run logs again the steps after its checkpoint: TensorBoard drops what
        # an earlier attempt logged from `first_step` on, so no step appears twice.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step or None)
        if config:
            lines = [f"{k} = {v!r}" for k, v in sorted(config.items())]
            self.writer.add_text("train_config", "    " + "\n    ".join(lines), 0)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in record.items():
            if name == "step" or not _number(value):
                continue
            self.writer.add_scalar(name, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(
    kind: str,
    run_dir: Path | None,
    main: bool = True,
    config: dict[str, Any] | None = None,
    first_step: int = 0,
) -> Tracker:
    """The tracker `kind` names, writing into `run_dir` (a no-op off the main rank), from
    `first_step` on (a resumed run: what was logged from there on is replaced)."""
    if kind == "none" or not main:
        return NoTracker()
    if kind == "tensorboard":
        if run_dir is None:
            raise TrackingError(
                "tracking = 'tensorboard' writes into the run directory; give an output "
                "directory (--out) or set tracking = 'none'"
            )
        return TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR, config, first_step)
    raise TrackingError(f"unknown tracking {kind!r}; choose 'none' or 'tensorboard'")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
