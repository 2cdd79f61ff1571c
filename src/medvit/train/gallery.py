"""The test-time gallery: pictures of the most confident misclassified test cases.

After ``trainer.test``, :class:`TestGallery` renders the cases :func:`medvit.evaluate.cases.
misclassified_cases` picks (most confident wrong first; multi-label: the largest errors) to
``gallery/misclassified/test_{index}.png`` and lists them in ``gallery/misclassified.json``
(:func:`medvit.runs.write_gallery`), which ``medvit report`` and the wandb test table show.
The pixels come from the test dataset of the data module, as the model saw them (resized,
before normalisation); a volume is drawn as its mid axial, coronal and sagittal slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from medvit import runs
from medvit.evaluate.case_plots import case_png, denormalize
from medvit.evaluate.cases import Case, misclassified_cases
from medvit.fileio import atomic_write

SECTION = "misclassified"


def dataset_of_test(trainer: L.Trainer) -> Any:
    """The dataset of the trainer's (first) test dataloader; a ValueError when there is none."""
    loader = trainer.test_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError("The test gallery needs trainer.test_dataloaders with a dataset.")
    return dataset


def normalisation(trainer: L.Trainer) -> tuple[Any, Any]:
    """The data module's ``(mean, std)`` (``None`` each when it has none: medvit's 0.5)."""
    hparams = getattr(trainer.datamodule, "hparams", None) or {}
    return hparams.get("mean"), hparams.get("std")


def case_sample(dataset: Any, index: int, mean: Any, std: Any) -> np.ndarray:
    """Test item ``index`` as the model saw it, back on [0, 1]: (C, H, W) or (C, D, H, W)."""
    image = dataset[index][0]
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().float().cpu().numpy()
    return denormalize(image, mean, std)


def write_case_pictures(
    run_dir: Path,
    section: str,
    cases: list[Case],
    dataset: Any,
    mean: Any = None,
    std: Any = None,
    dpi: int = 100,
) -> list[dict[str, Any]]:
    """Render ``cases`` to ``gallery/{section}/test_{index}.png``; their gallery entries.

    Every picture is written atomically; pictures of an earlier test in this run folder that
    are not among the new ones are removed by :func:`write_gallery_section` after the JSON.
    """
    entries = []
    for case in cases:
        sample = case_sample(dataset, case.index, mean, std)
        path = runs.gallery_image_path(run_dir, section, f"test_{case.index:05d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"true: {case.true} · predicted: {case.predicted}"
        with atomic_write(path, "wb") as fh:
            fh.write(case_png(sample, title, dpi=dpi))
        entries.append(
            {
                "image": path.relative_to(run_dir).as_posix(),
                "index": case.index,
                "true": case.true,
                "predicted": case.predicted,
                "probability": round(case.probability, 6),
                "caption": case.caption,
                "kind": "wrong",
            }
        )
    return entries


def write_gallery_section(run_dir: Path, section: str, entries: list[dict[str, Any]]) -> None:
    """``gallery/{section}.json`` (after the pictures), then drop pictures no entry names."""
    runs.write_gallery(run_dir, section, entries)
    keep = {Path(e["image"]).name for e in entries}
    folder = runs.gallery_image_path(run_dir, section, "x.png").parent
    for stale in folder.glob("*.png") if folder.is_dir() else ():
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


class TestGallery(L.Callback):
    """After ``trainer.test``, write the gallery of the most confident misclassified test cases.

    Only global rank 0 writes (the test predictions are gathered over every rank). Wire it
    before :class:`~medvit.train.wandb_logging.WandbTestMedia`, which logs these pictures.

    Args:
        max_cases: at most this many pictures; 0 writes none (and no ``misclassified.json``).
        dpi: resolution of the pictures.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, max_cases: int = 12, dpi: int = 100) -> None:
        if max_cases < 0:
            raise ValueError(f"max_cases must be >= 0, got {max_cases}.")
        self.max_cases, self.dpi = max_cases, dpi
        self.run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a broadcast under DDP: every rank asks here, not only rank 0 later.
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preds = getattr(pl_module, "test_predictions", None)
        if not trainer.is_global_zero or preds is None or self.max_cases == 0:
            return
        run_dir = self.run_dir or Path(trainer.default_root_dir)
        try:
            predictions = runs.Predictions.from_module(pl_module)
            cases = misclassified_cases(predictions, self.max_cases)
            mean, std = normalisation(trainer)
            dataset = dataset_of_test(trainer) if cases else None
            entries = write_case_pictures(run_dir, SECTION, cases, dataset, mean, std, dpi=self.dpi)
            write_gallery_section(run_dir, SECTION, entries)
        except (ValueError, OSError, IndexError) as err:
            # The metrics and predictions are written by now: pictures must not fail the run.
            rank_zero_warn(f"The test-case gallery of {run_dir} was not written: {err}")
