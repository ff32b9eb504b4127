"""What people look at rather than read: sampled rollouts (image + text + reward) and reward curves.

Both go to the MLflow run of Lightning's MLFlowLogger as artifacts (no fluent mlflow API).
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    """The run's MLflow logger; None on DDP ranks > 0, which hold no run."""
    if not trainer.is_global_zero:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def rollouts_html(samples: list[dict], step: int) -> str:
    """A self-contained page: one card per rollout with its image(s), prompt, completion and reward."""
    cards = []
    for s in samples:
        images = [s["image"], *s.get("crops", [])]
        imgs = "".join(f'<img src="data:image/png;base64,{_png_b64(im)}" height="224">' for im in images)
        terms = ", ".join(f"{k}={v}" for k, v in s["terms"].items())
        cards.append(
            f"<div style='border:1px solid #ccc;margin:8px;padding:8px'>{imgs}"
            f"<p><b>{html.escape(s['id'])}</b> key={html.escape(s['answer'])} reward={s['reward']:.3f} ({terms})</p>"
            f"<pre style='white-space:pre-wrap'>{html.escape(s['prompt'])}</pre>"
            f"<pre style='white-space:pre-wrap;background:#f4f4f4'>{html.escape(s['completion'])}</pre></div>"
        )
    return f"<html><body><h3>rollouts at step {step}</h3>{''.join(cards)}</body></html>"


class RolloutSamples(L.Callback):
    """Every `every_n_steps` optimiser steps: rollouts/step_XXXXXX.html in the MLflow run."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._last_logged = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        logger = _mlflow(trainer)
        due = step % self.every_n_steps == 0 or step == 1
        if logger is None or not pl_module.last_samples or not due or step == self._last_logged:
            return
        self._last_logged = step
        logger.experiment.log_text(
            logger.run_id, rollouts_html(pl_module.last_samples, step), f"rollouts/step_{step:06d}.html"
        )


class RewardCurve(L.Callback):
    """When training ends, plot the history of `keys` from the MLflow run into plots/reward_curve.png."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)

    def on_train_end(self, trainer, pl_module) -> None:
        logger = _mlflow(trainer)
        if logger is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        client, run_id = logger.experiment, logger.run_id
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in self.keys:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if not history:
                continue
            steps, values = [m.step for m in history], [m.value for m in history]
            if len(values) < 30:
                ax.plot(steps, values, label=key, marker=".")
                continue
            # raw per-step values are noisy (a handful of prompts each): draw them faint, plus a running mean
            (line,) = ax.plot(steps, values, alpha=0.25)
            window = max(5, len(values) // 20)
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, color=line.get_color(), label=f"{key} (mean of {window})")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("value")
        ax.grid(alpha=0.3)
        ax.legend()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reward_curve.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            client.log_artifact(run_id, str(path), artifact_path="plots")
        plt.close(fig)
