"""The report's "explained" gallery, written at the end of a test: per class, the most
confident correct and the most confident wrong test case, with their overlays.

Runs on global rank 0 after ``trainer.test`` only (training is untouched): a handful of
forward and backward passes on the test images picked. A network without attention layers is
skipped with one log line. The pictures and ``gallery/explained.json`` follow
:func:`medvit.runs.write_gallery`'s contract, which the report and wandb read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from medvit import runs
from medvit.explain.attention import NoAttentionError
from medvit.explain.explainer import Explainer

_logger = logging.getLogger(__name__)

SECTION = "explained"


def pick_cases(probs: np.ndarray, target: np.ndarray, task: str) -> list[dict[str, Any]]:
    """Per class, the most confident correct and most confident wrong case (rows of ``probs``).

    Single-label: among the cases of true class ``c``, the correct one with the highest
    probability of ``c`` and the wrong one with the highest probability of its (wrong)
    prediction; the map is for the predicted class. Multi-label: among the cases predicted
    positive for ``c`` (probability > 0.5), the true positive and the false positive with the
    highest probability of ``c``; the map is for ``c``.

    Returns:
        ``{"row", "cls", "kind" ("correct" | "wrong"), "explain" (class index)}`` dicts.
    """
    picks = []
    for c in range(probs.shape[1]):
        if task == "multilabel":
            positive = probs[:, c] > 0.5
            truth = target.reshape(len(target), -1)[:, c] > 0
            groups = (("correct", positive & truth), ("wrong", positive & ~truth))
            score = probs[:, c]
        else:
            true = target.reshape(len(target), -1)[:, 0].astype(int)
            predicted = probs.argmax(1)
            groups = (
                ("correct", (true == c) & (predicted == c)),
                ("wrong", (true == c) & (predicted != c)),
            )
            score = probs.max(1)
        for kind, mask in groups:
            if mask.any():
                row = int(np.flatnonzero(mask)[score[mask].argmax()])
                explain = c if task == "multilabel" else int(probs[row].argmax())
                picks.append({"row": row, "cls": c, "kind": kind, "explain": explain})
    return picks


def _names(values: np.ndarray, names: list[str], task: str) -> str:
    if task == "multilabel":
        return ";".join(names[k] for k in np.flatnonzero(np.ravel(values))) or "(none)"
    return names[int(np.ravel(values)[0])]


class ExplainedGallery(L.Callback):
    """After ``trainer.test``: write the ``explained`` gallery section of the run folder.

    Args:
        method: the explanation method (:data:`~medvit.explain.methods.METHODS`).
    """

    def __init__(self, method: str = "grad_rollout") -> None:
        self.method = method
        self.run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a broadcast under DDP: every rank asks here, not only rank 0 later
        # (rank 0 alone asking in on_test_end would wait for the others forever).
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self.write(trainer, pl_module)
        except (RuntimeError, ValueError, OSError) as err:
            # The run's metrics and predictions are written; a picture must not fail the run.
            _logger.warning("The explained test-case gallery was not written: %s", err)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Pick the cases, explain them and write their overlays and the gallery section."""
        preds = getattr(pl_module, "test_predictions", None)
        if not trainer.is_global_zero or preds is None or not len(preds["index"]):
            return
        try:
            explainer = Explainer(pl_module, self.method)
        except NoAttentionError:
            _logger.info("No attention layers in the network: no explained test-case gallery.")
            return
        loader = trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            return
        hp = pl_module.hparams
        task = hp.get("task", "")
        names = list(hp.get("class_names") or [str(i) for i in range(preds["probs"].shape[1])])
        picks = pick_cases(preds["probs"], preds["target"], task)
        if not picks:
            return
        from medvit.explain.overlay import display_image, write_overlay  # matplotlib: only now

        data_hp = getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule else {}
        shown = (data_hp.get("mean"), data_hp.get("std"))
        run_dir = self.run_dir or Path(trainer.default_root_dir)
        indices = [int(preds["index"][p["row"]]) for p in picks]
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
        targets = torch.tensor([p["explain"] for p in picks])
        # a few cases per class: in chunks, so that many classes and large models stay small
        maps = np.concatenate(
            [
                explainer(xs.to(pl_module.device), ts).maps.cpu().numpy()
                for xs, ts in zip(x.split(16), targets.split(16), strict=True)
            ]
        )
        entries = []
        for pick, index, image, heat in zip(picks, indices, x.numpy(), maps, strict=True):
            row, c = pick["row"], pick["cls"]
            probs = preds["probs"][row]
            true = _names(preds["target"][row], names, task)
            if task == "multilabel":
                predicted, probability = _names(probs > 0.5, names, task), float(probs[c])
            else:
                predicted, probability = names[int(probs.argmax())], float(probs.max())
            caption = f"most confident {pick['kind']} of class {names[c]}"
            title = f"test [{index}]: predicted {predicted} (p={probability:.2f}) · true {true}"
            name = f"test_{index:05d}_c{c}_{pick['kind']}.png"
            path = runs.gallery_image_path(run_dir, SECTION, name)
            write_overlay(path, display_image(image, *shown), heat, f"{title}\n{caption}")
            entries.append(
                {
                    "image": path.relative_to(run_dir).as_posix(),
                    "index": index,
                    "true": true,
                    "predicted": predicted,
                    "probability": round(probability, 4),
                    "caption": caption,
                    "method": self.method,
                    "kind": pick["kind"],
                }
            )
        runs.write_gallery(run_dir, SECTION, entries)
