"""SIGINT / SIGTERM as a clean stop: finish the optimiser step, save `last.ckpt`, end the run KILLED.

A scheduler (SLURM, Kubernetes) sends SIGTERM before it kills a job; a person presses Ctrl+C.
During training the first signal lets the current step finish, so the checkpoint is written at a
step boundary and resuming from it is exact; a second signal, or a signal outside training
(model loading, evaluation), stops at once. The process then exits with 128 + the signal number
(130, 143), so a scheduler or a sweep never mistakes it for success.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import lightning as L

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The job was stopped by a signal; like KeyboardInterrupt, no `except Exception` swallows it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f" at step {step}" if step is not None else ""
        saved = f"; saved {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {self.signal_name}{where}{saved}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop(L.Callback):
    """Turns SIGINT/SIGTERM during fit into a checkpoint at the next step boundary, then `Interrupted`."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signum: int | None = None
        self.saved: str | None = None  # the checkpoint written on the way out
        self._training = False
        self._in_step = False

    @contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM for the duration of the block, then restore the previous handlers."""
        previous = {s: signal.getsignal(s) for s in HANDLED}
        for s in HANDLED:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (first and self._training):  # nothing to save at a step boundary, or asked twice: stop now
            raise Interrupted(signum)
        print(f"medvr: {signal.Signals(signum).name} received; stopping after this step (again to stop now)", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._training = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._training = False

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Lightning stops on SIGTERM itself during evaluation (SIGTERMException): the training state is at
        # a step boundary there, so it is saved as well; a stop in the middle of a step saves nothing
        if self.signum is not None and self._training and not self._in_step and self.saved is None:
            self._save(trainer)
        self._training = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        if self.signum is None:
            return
        self._save(trainer)
        self._training = False
        raise Interrupted(self.signum, step=trainer.global_step, checkpoint=self.saved)

    def _save(self, trainer) -> None:
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = str(path)
