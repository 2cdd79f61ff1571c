"""Knowledge distillation: a frozen teacher's logits as a second training target.

Two kinds, chosen by the student network:

- **DeiT-style** (Touvron et al. 2021): a student with a distillation token and head (timm's
  distilled ViTs, e.g. ``deit_tiny_distilled_patch16_224``). In training it returns two logits,
  ``(cls, dist)``: the class head learns the labels, the distillation head the teacher. At
  evaluation (validation, test, predict, export) the network returns the **average of the two
  heads**, as DeiT does, so a distilled student's checkpoint is used like any other.
- **Plain logit distillation** (Hinton et al. 2015): any other student; its one head learns both.

The loss, with ``alpha`` the teacher's weight:
``(1 - alpha) * CE(cls, labels) + alpha * KD(dist, teacher)`` (``dist = cls`` without a token), where
KD is ``hard``: cross-entropy on the teacher's argmax (DeiT's choice; multi-label: BCE on the
teacher's sigmoid > 0.5), or ``soft``: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (multi-label:
``T^2 * BCE(s/T, sigmoid(t/T))``). The label term is the module's own loss (label smoothing,
class weights).

The teacher is any medvit checkpoint of the same data (classes, task, channels, image size). It
runs on the same augmented batch as the student, frozen (no gradients) and in eval mode (its
dropout and batch-norm statistics fixed). It is kept out of the student's modules on purpose:
its weights are not saved in the student's checkpoint, ``trainer.fit``'s ``train()`` calls do
not reach it, the optimiser never sees it, and under DDP each rank holds its own copy.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from medvit import runs
from medvit.models.checkpoint import CheckpointError, load_checkpoint

DistillType = Literal["hard", "soft"]
DISTILL_TYPES = ("hard", "soft")


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: DistillType,
    temperature: float = 1.0,
    multilabel: bool = False,
) -> torch.Tensor:
    """The distillation term: how far the student's logits are from the teacher's.

    Args:
        student: (B, C) student logits (the distillation head's for DeiT).
        teacher: (B, C) teacher logits (no gradient).
        kind: ``hard`` (cross-entropy on the teacher's decision) or ``soft`` (KL at temperature
            ``T``, scaled by ``T^2`` so its gradients keep their size as ``T`` changes).
        temperature: ``T`` of the soft kind (ignored by hard).
        multilabel: one sigmoid per label instead of a softmax over classes.
    """
    teacher = teacher.detach().float()
    student = student.float()
    if kind == "hard":
        if multilabel:
            return F.binary_cross_entropy_with_logits(student, (teacher > 0).float())
        return F.cross_entropy(student, teacher.argmax(dim=1))
    if kind != "soft":
        raise ValueError(f"distill_type must be one of {DISTILL_TYPES}, got {kind!r}.")
    t = temperature
    if multilabel:
        return F.binary_cross_entropy_with_logits(student / t, (teacher / t).sigmoid()) * t * t
    return (
        F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def distillation_loss(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    target: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_loss: Any,
    alpha: float,
    kind: DistillType,
    temperature: float = 1.0,
    multilabel: bool = False,
) -> torch.Tensor:
    """``(1 - alpha) * label_loss(cls, target) + alpha * kd_loss(dist, teacher_logits)``.

    Args:
        outputs: the student's training output: logits, or DeiT's ``(cls, dist)`` pair.
        target: the labels, as ``label_loss`` takes them.
        teacher_logits: (B, C) teacher logits of the same batch.
        label_loss: the module's loss on the labels, ``(logits, target) -> loss``.
        alpha: weight of the teacher term in [0, 1].
        kind, temperature, multilabel: see :func:`kd_loss`.
    """
    cls, dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    kd = kd_loss(dist, teacher_logits, kind, temperature, multilabel)
    return (1 - alpha) * label_loss(cls, target) + alpha * kd


def check_distill_args(teacher: Any, kind: str, alpha: float, temperature: float) -> None:
    """Refuse distillation options that cannot work, naming the option."""
    if kind not in DISTILL_TYPES:
        raise ValueError(f"distill_type must be one of {DISTILL_TYPES}, got {kind!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill_alpha must lie in [0, 1], got {alpha}.")
    if temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {temperature}.")
    if teacher is not None and not isinstance(teacher, (str, os.PathLike)):
        raise ValueError(f"teacher must be the path of a medvit checkpoint, got {teacher!r}.")


#: What a teacher's training data must share with the student's, and how a mismatch is named.
MATCHED = {
    "num_classes": "classes",
    "task": "task",
    "in_chans": "input channels",
    "img_size": "image size (px)",
}


def expected_of(source: Any) -> dict[str, Any]:
    """What a teacher must match (:data:`MATCHED` and ``class_names``), read as attributes of
    ``source``: the student's data module, or its module's hyper-parameters."""
    expected = {key: getattr(source, key) for key in MATCHED}
    names = getattr(source, "class_names", None)
    expected["class_names"] = list(names) if names else None
    return expected


def teacher_problems(hp: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per way the teacher's training data (its hyper-parameters) differ from the data.

    Args:
        hp: the teacher checkpoint's ``hyper_parameters``.
        expected: :data:`MATCHED`'s keys and optionally ``class_names`` of the data the student
            trains on (:func:`expected_of`).
    """
    problems = []
    for key, words in MATCHED.items():
        if hp.get(key) != expected.get(key):
            problems.append(
                f"the teacher's {words} is {hp.get(key)!r} but the data's is {expected.get(key)!r}"
            )
    names, want = hp.get("class_names"), expected.get("class_names")
    if names and want and list(names) != list(want) and not problems:
        problems.append(f"the teacher's classes are {list(names)} but the data's are {list(want)}")
    return problems


def read_teacher_checkpoint(path: str | os.PathLike, expected: dict[str, Any]) -> dict[str, Any]:
    """Read the teacher checkpoint safely and check it against the data, before any work.

    Raises:
        CheckpointError: the file is missing, unreadable, not written by medvit, or trained on
            other data (one line per difference).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} does not exist (a medvit run's "
            "checkpoints/best.ckpt, e.g. from `medvit fit ... --model "
            "configs/model/resnet18_teacher.yaml`)."
        )
    ckpt = load_checkpoint(path, mmap=True)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "model_name" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(
            f"teacher {str(path)!r} is not a medvit checkpoint (no model hyper-parameters or "
            "weights); train the teacher with `medvit fit`."
        )
    problems = teacher_problems(hp, expected)
    if problems:
        raise CheckpointError(
            f"teacher {str(path)!r} does not fit the data: " + "; ".join(problems)
        )
    return ckpt


def teacher_record(path: str | os.PathLike, hp: dict[str, Any]) -> dict[str, Any]:
    """What the student's ``meta.json`` says about its teacher: file, run, setting, metrics."""
    path = Path(path).expanduser().resolve()
    record: dict[str, Any] = {
        "checkpoint": str(path),
        "model_name": hp.get("model_name"),
        "pretrained": hp.get("pretrained"),
        # The teacher's own settings (its hyper-parameters, plain values only).
        "setting": {
            k: v
            for k, v in hp.items()
            if not k.startswith("_") and (v is None or isinstance(v, (str, int, float, bool)))
        },
    }
    run_dir = runs.run_dir_of_checkpoint(path)
    if run_dir is not None:
        record["run_dir"] = str(run_dir)
        metrics = runs.read_metrics(run_dir)
        for stage in ("val", "test"):
            if stage in metrics:
                record[f"{stage}_metrics"] = metrics[stage]
    return record


def normalisation(data_hp: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """``(mean, std)`` a data module with these hyper-parameters normalises with (its default:
    0.5, 0.5; a pretrained model's own statistics when ``medvit fit`` set them)."""
    data_hp = data_hp or {}
    return list(data_hp.get("mean") or [0.5]), list(data_hp.get("std") or [0.5])


class Teacher:
    """A frozen teacher network in eval mode, with its cost per training step measured.

    A plain object, not an ``nn.Module``: assigned to a LightningModule attribute it stays out
    of the student's modules, state dict, optimiser and ``train()`` calls.

    When the teacher was trained on differently normalised inputs (e.g. a pretrained CNN
    teacher with ImageNet statistics, a student from scratch with 0.5/0.5), the student's batch
    is mapped back to pixels and normalised the teacher's way before the teacher sees it.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        record: dict[str, Any],
        student_norm: tuple[list[float], list[float]] | None = None,
        teacher_norm: tuple[list[float], list[float]] | None = None,
    ) -> None:
        self.net = net.eval().requires_grad_(False)
        self.record = record
        # x_teacher = x * scale + shift = ((x * std_s + mean_s) - mean_t) / std_t, per channel.
        self._affine = None
        if student_norm is not None and teacher_norm is not None and student_norm != teacher_norm:
            (mean_s, std_s), (mean_t, std_t) = (
                [torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in pair]
                for pair in (student_norm, teacher_norm)
            )
            self._affine = (std_s / std_t, (mean_s - mean_t) / std_t)
        record["input_renormalised"] = self._affine is not None
        self.seconds = 0.0
        self.steps = 0
        self._events: list[tuple[Any, Any]] = []
        self._device = torch.device("cpu")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        expected: dict[str, Any],
        student_norm: tuple[list[float], list[float]] | None = None,
    ) -> Teacher:
        """Load the teacher of ``path`` (checked against ``expected``, see
        :func:`read_teacher_checkpoint`); ``student_norm`` is the student data's ``(mean,
        std)`` (default 0.5, 0.5)."""
        # Imported here: module.py imports this file.
        from medvit.models.module import ViTClassifier

        ckpt = read_teacher_checkpoint(path, expected)
        hp = dict(ckpt["hyper_parameters"])
        params = inspect.signature(ViTClassifier.__init__).parameters
        # The weights come from the checkpoint: no weight file or hub read, no grand-teacher.
        init = {k: v for k, v in hp.items() if k in params}
        init.update(pretrained=False, compile=False, teacher=None)
        if "pos_embed" in init and init["pos_embed"] == "auto":
            # "auto" meant the pretrained table for a fine-tuned teacher: keep its layout.
            init["pos_embed"] = "learn" if hp.get("pretrained") not in (False, None) else "sincos"
        module = ViTClassifier(**init)
        module.on_load_checkpoint(ckpt)  # fills what older checkpoints lack, as Lightning does
        missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"teacher {str(path)!r} does not fit its own configuration (missing: "
                f"{missing[:3]}, unexpected: {unexpected[:3]}); was it written by another medvit?"
            )
        teacher_norm = normalisation(ckpt.get("datamodule_hyper_parameters"))
        student_norm = student_norm or normalisation(None)
        return cls(module.net, teacher_record(path, hp), student_norm, teacher_norm)

    @classmethod
    def for_student(cls, hp: Any, data_hp: dict[str, Any] | None = None) -> Teacher:
        """The teacher named by a student's hyper-parameters, checked against its data (whose
        hyper-parameters ``data_hp`` give the normalisation)."""
        return cls.from_checkpoint(hp["teacher"], expected_of(hp), normalisation(data_hp))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (B, C) for ``x``, timed; the network is put back in eval mode
        first in case a caller switched it."""
        self.net.eval()
        if self._device != x.device:  # follows the student (moved by Lightning after setup)
            self.net.to(x.device)
            self._device = x.device
            if self._affine is not None:
                self._affine = tuple(t.to(x.device) for t in self._affine)
        if self._affine is not None:
            x = x * self._affine[0] + self._affine[1]
        if x.device.type == "cuda":
            # Events: no host sync in the training loop; read at the epoch's end.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = self.net(x)
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            logits = self.net(x)
            self.seconds += time.perf_counter() - t0
        self.steps += 1
        return logits.float()

    def ms_per_step(self) -> float | None:
        """Mean teacher forward time per training step so far, in milliseconds."""
        if self._events:
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000
            self._events.clear()
        return 1000 * self.seconds / self.steps if self.steps else None

    def info(self) -> dict[str, Any]:
        """:attr:`record` plus the measured cost, for ``meta.json``."""
        ms = self.ms_per_step()
        return {**self.record, "ms_per_step": None if ms is None else round(ms, 3)}
