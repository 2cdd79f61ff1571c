"""The ``Predictions`` type: what ``test_predictions.npz`` holds, and its reader and writer."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvit.fileio import atomic_write
from medvit.runs.layout import one_line

TASKS = ("binary", "multiclass", "multilabel", "ordinal")


# ------------------------------------------------------------------------------ predictions
@dataclass
class Predictions:
    """Test-set predictions: what ``test_predictions.npz`` holds.

    Args:
        probs: (N, C) probabilities (softmax, or sigmoid per label for multi-label).
        target: (N,) class indices, or (N, L) 0/1 labels for multi-label.
        class_names: one name per class; default ``"0"``, ``"1"``, ...
        task: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``; inferred when ``None``.
        index: (N,) sample index within the split; default ``0..N-1``.
        positive: binary tasks: the index of the positive class (the one curves are about).
    """

    probs: np.ndarray
    target: np.ndarray
    class_names: list[str] = field(default_factory=list)
    task: str | None = None
    index: np.ndarray | None = None
    positive: int = 1

    def __post_init__(self) -> None:
        self.probs = np.asarray(self.probs, dtype=np.float64)
        self.target = np.asarray(self.target)
        if self.probs.ndim != 2:
            raise ValueError(f"probs must have shape (N, C), got {self.probs.shape}.")
        n, c = self.probs.shape
        if self.target.ndim == 2 and self.target.shape[1] == 1:
            self.target = self.target[:, 0]
        if len(self.target) != n:
            raise ValueError(f"{len(self.target)} targets for {n} rows of probabilities.")
        if not self.task:
            self.task = (
                "multilabel" if self.target.ndim == 2 else ("binary" if c == 2 else "multiclass")
            )
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got '{self.task}'.")
        if self.task == "multilabel" and self.target.shape != self.probs.shape:
            raise ValueError(
                f"multi-label targets {self.target.shape} != probs {self.probs.shape}."
            )
        if self.task == "binary" and c != 2:
            raise ValueError(f"A binary task has 2 probability columns, got {c}.")
        self.target = self.target.astype(np.int64)
        names = [str(x) for x in (self.class_names if len(self.class_names) else range(c))]
        if len(names) != c:
            raise ValueError(f"{len(names)} class names for {c} classes.")
        self.class_names = names
        self.index = np.arange(n) if self.index is None else np.asarray(self.index)

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        """Read a ``test_predictions.npz`` (or ``ensemble_test_predictions.npz``)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} does not exist.")
        with np.load(path, allow_pickle=False) as npz:
            missing = {"probs", "target"} - set(npz.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)} (keys: {sorted(npz.files)}).")
            return cls(
                probs=npz["probs"],
                target=npz["target"],
                class_names=[str(x) for x in npz["class_names"]] if "class_names" in npz else [],
                task=str(npz["task"]) if "task" in npz else None,
                index=npz.get("index"),
                positive=int(npz["positive_class"]) if "positive_class" in npz else 1,
            )

    @classmethod
    def from_module(cls, module: Any) -> Predictions:
        """From a ``ViTClassifier`` after ``trainer.test`` (its ``test_predictions``)."""
        preds = getattr(module, "test_predictions", None)
        if preds is None:
            raise ValueError("module.test_predictions is None: run trainer.test(...) first.")
        hp = module.hparams
        return cls(
            probs=preds["probs"],
            target=preds["target"],
            class_names=list(hp.get("class_names") or []),
            task=hp.get("task"),
            index=preds["index"],
            positive=int(hp.get("positive_class", 1)),
        )

    @property
    def num_classes(self) -> int:
        """Columns of ``probs``."""
        return self.probs.shape[1]

    @property
    def predicted(self) -> np.ndarray:
        """Predicted class (N,), or 0/1 labels (N, L) for multi-label: probability > 0.5, as torchmetrics counts."""
        if self.task == "multilabel":
            return (self.probs > 0.5).astype(np.int64)
        return self.probs.argmax(axis=1)

    def tensors(self) -> tuple[Any, Any]:
        """``(probs, target)`` as torch tensors for torchmetrics."""
        import torch  # only callers that compute metrics pay for torch

        return torch.from_numpy(self.probs).float(), torch.from_numpy(self.target)

    def positive_tensors(self) -> tuple[Any, Any]:
        """Binary: ``(P(positive), 1 if positive else 0)`` as torch tensors."""
        probs, target = self.tensors()
        return probs[:, self.positive].contiguous(), (target == self.positive).long()


def write_predictions(
    path: Path,
    *,
    probs: np.ndarray,
    target: np.ndarray,
    index: np.ndarray,
    class_names: list[str],
    task: str,
    positive_class: int = 1,
) -> None:
    """Write a predictions ``.npz`` in the layout :meth:`Predictions.load` reads."""
    with atomic_write(path, "wb") as fh:
        np.savez(
            fh,
            class_names=np.array(class_names),
            task=np.array(task),
            positive_class=np.array(positive_class),
            index=np.asarray(index),
            probs=np.asarray(probs),
            target=np.asarray(target),
        )


def read_predictions(path: Path) -> Predictions | None:
    """A predictions ``.npz`` (None when absent); any defect is a ValueError naming the file."""
    if not path.is_file():
        return None
    try:
        return Predictions.load(path)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {one_line(err)}") from err
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a readable predictions .npz ({type(err).__name__}: {one_line(err)})."
        ) from err
