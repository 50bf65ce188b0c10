"""The compact console view of a running sweep (`-q`): one line per trial event (started, an epoch
with its loss, AP and the trial's ETA, ended), instead of Tune's tables and result boxes. The full
detail stays in the logs, TensorBoard and the Parquet files."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ray.tune import Callback


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressCallback(Callback):
    """Prints `[done/total] trial_id: event` lines. `epochs` maps each trial id to its epoch count."""

    def __init__(self, epochs: dict[str, int], stream: TextIO | None = None) -> None:
        self.epochs = epochs
        self.stream = stream
        self._started: dict[str, float] = {}
        self._first_epoch: dict[str, tuple[int, float]] = {}  # the first report: epoch, time
        self._ended: set[str] = set()

    def _say(self, trial_id: str, text: str) -> None:
        print(f"[{len(self._ended)}/{len(self.epochs)} done] {trial_id}: {text}", file=self.stream or sys.stdout,
              flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.config["trial_id"]
        self._started[tid] = time.monotonic()
        self._say(tid, "started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epochs_completed" not in result:
            return
        tid = trial.config["trial_id"]
        done, total = int(result["epochs_completed"]), self.epochs.get(trial.config["trial_id"], 0)
        now = time.monotonic()
        if tid not in self._first_epoch:
            # The first report: the epochs since this start (a trial evaluated every k epochs reports first at
            # epoch k; a resumed one started past 0: its checkpoint's 0-based epoch + 1).
            self._first_epoch[tid] = (done, now)
            start = int(result.get("resumed_from_epoch", -1)) + 1
            seconds_per_epoch = (now - self._started.get(tid, now)) / max(1, done - start)
        else:  # later: the rate between reports, exact for a resumed trial too (it starts past 0)
            first, since = self._first_epoch[tid]
            seconds_per_epoch = (now - since) / max(1, done - first)
        eta = seconds_per_epoch * max(0, total - done)
        ap, loss = result.get("ap"), result.get("loss")
        parts = [f"epoch {done}/{total}", f"loss {loss:.3f}" if isinstance(loss, float) else None,
                 f"AP {ap:.4f}" if isinstance(ap, float) else None,
                 f"AP50 {result['ap50']:.4f}" if isinstance(result.get("ap50"), float) else None,
                 f"ETA {_duration(eta)}" if done < total else None]
        self._say(tid, ", ".join(p for p in parts if p))

    def _end(self, trial: Any, text: str) -> None:
        tid = trial.config["trial_id"]
        self._ended.add(tid)
        took = time.monotonic() - self._started.get(tid, time.monotonic())
        self._say(tid, f"{text} after {_duration(took)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "failed (reason in results.parquet)")
