"""The LightningModule: any timm network (a ViT by default) with a task-aware loss, optimiser,
schedule, metrics and optional distillation from a teacher."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.aggregation import CatMetric

from medvit.models.distill import Teacher, check_distill_args, distillation_loss
from medvit.models.fitting import fit_temperature, warmup_cosine
from medvit.models.metrics import (
    TASKS,
    build_metrics,
    operating_point_metrics,
    operating_threshold,
)
from medvit.models.networks import create_network


class ViTClassifier(L.LightningModule):
    """Fine-tune or train a timm network for medical image classification.

    The network is any timm model (:func:`medvit.models.networks.create_network`): a ViT by
    default, or a CNN such as ``resnet18`` (``configs/model/resnet18_teacher.yaml``). The class
    keeps its historical name (saved configs and checkpoints name it); ``Classifier`` is the
    same class.

    ``num_classes``, ``in_chans``, ``img_size`` and ``task`` describe the data and have no
    default; the CLI links them (and ``class_names``, ``positive_class``) from the DataModule.
    The other defaults are the default recipe's (``configs/experiment/breastmnist.yaml``; a test
    keeps the two equal), so ``ViTClassifier(**data_args)`` trains as ``medvit fit`` does.

    Args:
        num_classes: classes, or labels for a multi-label task.
        in_chans: input channels (1 or 3).
        img_size: input side length in pixels (the cube's side for volumes).
        task: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``. Binary uses two logits
            with softmax; multi-label uses one sigmoid per label.
        class_names: names written next to predicted probabilities.
        positive_class: binary tasks: the class that sensitivity, specificity, F1 and the
            operating point are about (the data module links it, e.g. malignant for
            BreastMNIST, whose class 0 that is).
        target_sensitivity: binary tasks: the operating point is the highest threshold on the
            positive class's probability whose validation sensitivity reaches this value;
            ``None`` maximises Youden's J instead. It is applied unchanged to the test split.
        temperature_scaling: fit one temperature T on the validation split's logits (Guo et
            al. 2017: the NLL-optimal T, probabilities softmax(logits / T)) after each
            validation epoch. Test metrics, predictions and exports then use it; validation
            metrics and model selection do not. Accuracy is unchanged.
        spatial_dims: 2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W): a timm ViT with
            a 3D patch embedding (:mod:`medvit.models.vit3d`). The CLI links it from the data.
        model_name: any timm model, e.g. ``vit_tiny_patch16_224``,
            ``vit_small_patch16_224.augreg_in21k`` (a pretrained tag), ``resnet18`` or a
            distilled DeiT (``deit_tiny_distilled_patch16_224``, see ``teacher``). Volumes
            (``spatial_dims=3``) take ViTs only.
        patch_size: ViTs: patch side in pixels; ``None`` keeps the model's (3D: follows the
            cube's side, 4 for 28^3 and 8 for 64^3). Ignored by non-ViT networks.
        pos_embed: ViTs: ``auto`` (fixed sin-cos from scratch, the pretrained table when
            fine-tuning), ``learn`` (timm's learned embedding) or ``sincos``. Ignored by
            non-ViT networks.
        pretrained: ``False``, ``True`` (timm/hub weights of ``model_name``, needs internet) or
            a local ``.safetensors``/``.pth`` file. Position embeddings, patch embedding and
            input channels are adapted and the head is replaced when sizes differ.
        replace_pretrained_pos_embed: allow ``pos_embed="sincos"`` with ``pretrained`` weights,
            which replaces their position embedding (refused otherwise).
        stem: 3D ViTs: ``patch`` (one Conv3d, kernel = stride = patch) or ``conv`` (stride-2
            3x3x3 convolutions down to the patch grid, then a 1x1x1 projection; trains better
            from scratch on small sets). 2D networks take ``patch``.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth rate.
        lr: peak learning rate for the global batch (it does not change with the device count,
            because the DataModule's batch size is global too).
        weight_decay: AdamW weight decay; norms, biases, position embeddings and the class token
            get none.
        layer_decay: layer-wise learning-rate decay (e.g. 0.75 for fine-tuning); ``None`` is off.
        warmup_epochs: linear warm-up length before the cosine decay (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        label_smoothing: cross-entropy label smoothing (single-label tasks).
        class_weights: ``None``, ``"balanced"`` (inverse training frequency) or one weight per
            class; for multi-label tasks these are BCE ``pos_weight`` values.
        fused_optimizer: fused AdamW kernel; ``None`` uses it on CUDA only.
        compile: wrap the network in ``torch.compile`` (helps on GPU, not on CPU).
        teacher: a medvit checkpoint of the same data to distil from during ``fit``
            (:mod:`medvit.models.distill`); ``None`` trains on the labels alone. A student with
            a distillation token (a distilled DeiT) learns the teacher with its second head and
            predicts the average of both heads; any other student learns both with its head.
        distill_type: ``hard`` (the teacher's decision, DeiT's choice) or ``soft`` (its
            probabilities at ``distill_temperature``).
        distill_alpha: weight of the teacher term; ``1 - distill_alpha`` weighs the labels.
        distill_temperature: softmax temperature of the soft kind.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        img_size: int,
        task: Literal["binary", "multiclass", "multilabel", "ordinal"],
        class_names: list[str] | None = None,
        positive_class: int = 1,
        target_sensitivity: float | None = None,
        temperature_scaling: bool = False,
        spatial_dims: Literal[2, 3] = 2,
        model_name: str = "vit_tiny_patch16_224",
        patch_size: int | None = 4,
        pos_embed: Literal["auto", "learn", "sincos"] = "auto",
        pretrained: bool | str = False,
        replace_pretrained_pos_embed: bool = False,
        stem: Literal["patch", "conv"] = "patch",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        warmup_epochs: float = 2.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        class_weights: Literal["balanced"] | list[float] | None = None,
        fused_optimizer: bool | None = None,
        compile: bool = False,
        teacher: str | None = None,
        distill_type: Literal["hard", "soft"] = "hard",
        distill_alpha: float = 0.5,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got '{task}'.")
        if task == "binary" and num_classes != 2:
            raise ValueError(f"A binary task has num_classes=2 (two logits), got {num_classes}.")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}.")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes.")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(
                f"class_weights must be 'balanced', a list or None, got '{class_weights}'."
            )
        if isinstance(class_weights, list) and len(class_weights) != num_classes:
            raise ValueError(f"{len(class_weights)} class_weights for {num_classes} classes.")
        if task == "binary" and positive_class not in (0, 1):
            raise ValueError(f"positive_class of a binary task is 0 or 1, got {positive_class}.")
        if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        check_distill_args(teacher, distill_type, distill_alpha, distill_temperature)
        self.save_hyperparameters()
        self.net = create_network(
            model_name,
            spatial_dims=spatial_dims,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            patch_size=patch_size,
            pos_embed=resolve_pos_embed(pos_embed, pretrained),
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            pretrained=pretrained,
            replace_pretrained_pos_embed=replace_pretrained_pos_embed,
            stem=stem,
        )
        # Loaded in setup("fit") only; a plain object, so not one of this module's modules.
        self.teacher: Teacher | None = None
        # What the weight file gave (loaded / adapted / new tensors); RunRecorder puts it in
        # meta.json. None without pretrained weights.
        self.pretrained_summary = getattr(self.net, "pretrained_summary", None)
        weights = class_weights if isinstance(class_weights, list) else None
        self.register_buffer(
            "class_weights",
            torch.tensor(weights, dtype=torch.float32) if weights is not None else None,
            persistent=False,
        )
        # The default NaN check reads the loss on the host (``if nans.any()``) on every training
        # step, a device sync that stops the CPU from queueing the next step on a GPU. A NaN loss
        # still shows: it makes the logged epoch loss NaN, and on_train_epoch_end stops the fit.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_metrics = build_metrics(task, num_classes, prefix="val/")
        self.test_metrics = build_metrics(task, num_classes, prefix="test/")
        self.val_auroc_best = MaxMetric()
        # Test predictions gathered across ranks by torchmetrics, for reports and CV ensembles.
        self.test_index, self.test_probs, self.test_target = CatMetric(), CatMetric(), CatMetric()
        self.test_logits = CatMetric(nan_strategy="disable")  # for the ECE before calibration
        self.test_predictions: dict[str, np.ndarray] | None = None
        # The validation logits fit the temperature and (binary tasks) choose the operating
        # threshold. Both are buffers, so best.ckpt carries those of its own validation epoch.
        self.val_logits = CatMetric(nan_strategy="disable")
        self.val_target = CatMetric(nan_strategy="disable")
        self.register_buffer("op_threshold", torch.tensor(float("nan")))
        # 1 unless temperature_scaling fits one on validation; travels in the checkpoint too.
        self.register_buffer("temperature", torch.tensor(1.0))

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, num_classes)."""
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features, shape (B, D); for distillation and embeddings."""
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def probabilities(
        self, logits: torch.Tensor, temperature: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-class probabilities (B, C): softmax, or sigmoid per label for multi-label.

        Args:
            logits: (B, C) logits.
            temperature: divides the logits; ``None`` uses the fitted one (1 without
                ``temperature_scaling``).
        """
        logits = logits / (self.temperature if temperature is None else temperature)
        if self.hparams.task == "multilabel":
            return logits.sigmoid()
        return logits.softmax(dim=1)

    def _metric_input(self, probs: torch.Tensor) -> torch.Tensor:
        """Binary: the positive class's probability (B,); else all of them (B, C)."""
        return probs[:, self.hparams.positive_class] if self.hparams.task == "binary" else probs

    def _metric_target(self, target: torch.Tensor) -> torch.Tensor:
        """Binary: 1 for the positive class, 0 otherwise; else the target unchanged."""
        if self.hparams.task != "binary":
            return target
        return (target == self.hparams.positive_class).long()

    #: Buffers that checkpoints from older medvit versions lack; ``on_load_checkpoint`` fills them.
    optional_state_keys = ("op_threshold", "temperature")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints from before operating points have no threshold: none is applied.
        checkpoint["state_dict"].setdefault("op_threshold", torch.tensor(float("nan")))
        checkpoint["state_dict"].setdefault("temperature", torch.tensor(1.0))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (single-label) or BCE-with-logits (multi-label)."""
        if self.hparams.task == "multilabel":
            return F.binary_cross_entropy_with_logits(
                logits, target.float(), pos_weight=self.class_weights
            )
        return F.cross_entropy(
            logits,
            target,
            weight=self.class_weights,
            label_smoothing=self.hparams.label_smoothing,
        )

    # ---------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weights == "balanced":
            datamodule = self.trainer.datamodule
            counts = datamodule.class_counts("train").astype(np.float64)
            if self.hparams.task == "multilabel":
                # BCE pos_weight: negatives per positive, per label.
                weights = (len(datamodule.data_train) - counts) / np.maximum(counts, 1)
            else:
                weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
            self.class_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)
        if stage == "fit" and self.hparams.teacher and self.teacher is None:
            # The data's normalisation, if a data module is attached (0.5/0.5 otherwise).
            data = getattr(self._trainer, "datamodule", None)
            self.teacher = Teacher.for_student(self.hparams, getattr(data, "hparams", None))
            if hasattr(self.net, "set_distilled_training"):
                self.net.set_distilled_training(True)  # training returns (cls, dist) logits
        if self.hparams.compile and stage == "fit":
            # In place: state_dict keys stay "net.*" (test/predict load the checkpoint
            # uncompiled), and a second fit does not wrap the network twice.
            self.net.compile()

    @property
    def teacher_info(self) -> dict[str, Any] | None:
        """The teacher's record and cost for ``meta.json`` (``None`` without a teacher)."""
        return self.teacher.info() if self.teacher is not None else None

    def on_train_start(self) -> None:
        # The sanity check ran validation on a few batches; its values must not count as "best".
        self.val_loss.reset()
        self.val_metrics.reset()
        self.val_auroc_best.reset()

    def on_train_epoch_end(self) -> None:
        if self.teacher is not None and self.teacher.steps:
            self.log("train/teacher_ms_per_step", self.teacher.ms_per_step())
        # One host read per epoch instead of one per step (see train_loss above).
        if not self.train_loss.update_called:
            return
        loss = self.train_loss.compute()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The training loss of epoch {self.current_epoch} is {loss.item()}: training "
                "diverged. Lower --model.lr or raise --model.warmup_epochs."
            )

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        if self.teacher is None:
            loss = self.loss(self(x), y)
        else:
            hp = self.hparams
            # The teacher sees the very batch (augmentations included) the student sees.
            loss = distillation_loss(
                self(x),
                y,
                self.teacher(x),
                self.loss,
                hp.distill_alpha,
                hp.distill_type,
                hp.distill_temperature,
                multilabel=hp.task == "multilabel",
            )
        self.train_loss(loss)
        # Not prog_bar=True: Lightning would read it as a float after every step (a device sync).
        # The progress bar (medvit.train.progress) reads this tensor only when it refreshes.
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True)
        self.last_train_loss = loss.detach()
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self(x)
        self.val_loss.update(self.loss(logits, y), weight=len(y))
        # Uncalibrated (T = 1): model selection must not depend on the last epoch's temperature.
        probs = self.probabilities(logits, temperature=1.0)
        self.val_metrics.update(self._metric_input(probs), self._metric_target(y))
        if self.hparams.task == "binary" or self.hparams.temperature_scaling:
            self.val_logits.update(logits.float())
            self.val_target.update(y)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the states across ranks; per-step sync_dist logging would instead hang
        # when ranks hold different numbers of (unpadded) batches.
        values = self.val_metrics.compute()
        values["val/loss"] = self.val_loss.compute()
        self.val_auroc_best.update(values["val/auroc"])
        values["val/auroc_best"] = self.val_auroc_best.compute()
        auroc = values.pop("val/auroc")
        self.log("val/auroc", auroc, prog_bar=True)
        self.log_dict(values)
        self.val_metrics.reset()
        self.val_loss.reset()
        if self.val_logits.update_called:
            self._fit_on_validation()

    def _fit_on_validation(self) -> None:
        """Fit the temperature, then the operating threshold on the calibrated probabilities."""
        # compute() gathers every rank's cases, so all ranks fit the same values.
        logits = self.val_logits.compute().double().cpu()  # (N, C)
        target = self.val_target.compute().cpu()
        self.val_logits.reset()
        self.val_target.reset()
        if self.hparams.temperature_scaling:
            temperature = fit_temperature(logits, target, self.hparams.task)
            self.temperature.fill_(temperature)
            probs = self.probabilities(logits, temperature=temperature)
            values = {"temperature": temperature, "ece_calibrated": self._ece(probs, target)}
            self.log_dict({f"val/{k}": v for k, v in values.items()})
        if self.hparams.task == "binary":
            # The threshold is on the probabilities test will see: with the fitted temperature.
            probs = self._metric_input(self.probabilities(logits)).numpy()
            pos_target = self._metric_target(target).numpy()
            threshold = operating_threshold(probs, pos_target, self.hparams.target_sensitivity)
            self.op_threshold.fill_(threshold)
            op = operating_point_metrics(probs, pos_target, threshold)
            self.log_dict({f"val/{k}": v for k, v in op.items()})

    def _ece(self, probs: torch.Tensor, target: torch.Tensor) -> float:
        """The ``ece`` metric of this task for ``probs``, computed apart from the collections."""
        metric = build_metrics(self.hparams.task, self.hparams.num_classes, prefix="")["ece"]
        metric.update(self._metric_input(probs.float()), self._metric_target(target))
        return float(metric.compute())

    def on_test_epoch_start(self) -> None:
        for metric in (self.test_index, self.test_probs, self.test_target, self.test_logits):
            metric.reset()
        self.test_predictions = None

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, index = batch
        logits = self(x)
        probs = self.probabilities(logits)
        self.test_loss.update(self.loss(logits, y), weight=len(y))
        self.test_metrics.update(self._metric_input(probs), self._metric_target(y))
        self.test_index.update(index)
        self.test_probs.update(probs.float())
        self.test_target.update(y)
        if self.hparams.temperature_scaling:
            self.test_logits.update(logits.float())

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        values["test/loss"] = self.test_loss.compute()
        self.log_dict(values)
        self.test_metrics.reset()
        self.test_loss.reset()
        index = self.test_index.compute().long().cpu().numpy()
        order = np.argsort(index, kind="stable")
        self.test_predictions = {
            "index": index[order],
            "probs": self.test_probs.compute().cpu().numpy()[order],
            "target": self.test_target.compute().cpu().numpy()[order],
        }
        if self.hparams.temperature_scaling and self.test_logits.update_called:
            logits = self.test_logits.compute().double().cpu()[order]
            target = torch.from_numpy(self.test_predictions["target"])
            uncalibrated = self._ece(self.probabilities(logits, temperature=1.0), target)
            self.log_dict(
                {"test/temperature": float(self.temperature), "test/ece_uncalibrated": uncalibrated}
            )
        threshold = float(self.op_threshold)
        if self.hparams.task == "binary" and math.isfinite(threshold):
            # The validation split's operating point, applied unchanged to the test split.
            pos = self.hparams.positive_class
            preds = self.test_predictions
            target = preds["target"].reshape(-1) == pos
            op = operating_point_metrics(preds["probs"][:, pos], target, threshold)
            self.log_dict({f"test/{k}": v for k, v in op.items()})

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, _, index = batch
        return {"probs": self.probabilities(self(x)).float(), "index": index}

    # ---------------------------------------------------------------------------- optimiser
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, because such
        # an optimizer unscales fp16 gradients inside step(). Without a GradScaler (bf16-mixed)
        # nothing is scaled, so clipping the gradients here is exact, as in a plain torch loop.
        optimizer = getattr(optimizer, "optimizer", optimizer)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not gradient_clip_val or scaler is not None or not fused:
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        fused = hp.fused_optimizer if hp.fused_optimizer is not None else self.device.type == "cuda"
        plugin = getattr(self.trainer, "precision_plugin", None)
        if fused and getattr(plugin, "scaler", None) is not None and self.trainer.gradient_clip_val:
            # fp16 with a GradScaler: gradients are still scaled when they are clipped, which a
            # fused optimizer cannot allow (it unscales inside step()). Use the foreach kernel.
            fused = False
        optimizer = create_optimizer_v2(
            self.net,
            opt="adamw",
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
            **({"fused": True} if fused else {}),
        )
        for group in optimizer.param_groups:
            # timm stores layer decay as lr_scale for its own schedulers; torch's need it in lr.
            group["lr"] = hp.lr * group.get("lr_scale", 1.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, int(round(hp.warmup_epochs * total / epochs)))
        schedule = warmup_cosine(warmup, total, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def resolve_pos_embed(pos_embed: str, pretrained: bool | str) -> str:
    """``auto``: sin-cos from scratch (better on small sets), the pretrained table otherwise."""
    if pos_embed != "auto":
        return pos_embed
    return "learn" if pretrained is not False else "sincos"


#: The module under a name that does not promise a ViT; ``ViTClassifier`` stays (saved configs
#: and checkpoints name it).
Classifier = ViTClassifier
