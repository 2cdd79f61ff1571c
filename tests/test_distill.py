"""Distillation: loss terms against hand-computed values, the frozen teacher, checks, CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import short_trainer_args, short_trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

from medvit import runs
from medvit.cli import main
from medvit.models.checkpoint import CheckpointError
from medvit.models.distill import Teacher, distillation_loss, kd_loss, teacher_problems
from medvit.models.module import ViTClassifier

E = math.e
DATA = dict(num_classes=2, in_chans=1, img_size=28, task="binary", class_names=["a", "b"])
#: A small CNN teacher (0.4M parameters) and a small student: fast on CPU.
TEACHER = dict(model_name="lcnet_035", patch_size=None, drop_path_rate=0.0)
STUDENT = dict(patch_size=7, drop_path_rate=0.0, label_smoothing=0.0)

# One case: student logits s = [2, 0], teacher logits t = [0, 2], label 0.
S, T_LOGITS, Y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])


def test_soft_term_is_kl_at_temperature_times_t_squared():
    # T = 2: p_t = softmax([0, 1]) = [1, e] / (1 + e), q_s = softmax([1, 0]) = [e, 1] / (1 + e);
    # KL(p_t || q_s) = (1 * ln(1/e) + e * ln(e)) / (1 + e) = (e - 1) / (e + 1); times T^2 = 4.
    expected = 4 * (E - 1) / (E + 1)
    assert kd_loss(S, T_LOGITS, "soft", temperature=2.0).item() == pytest.approx(expected, 1e-6)
    # Equal logits: nothing to learn.
    assert kd_loss(S, S, "soft", temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_term_is_cross_entropy_on_the_teachers_argmax():
    # The teacher says class 1: -ln softmax([2, 0])[1] = ln(1 + e^2); T plays no part.
    expected = math.log(1 + E**2)
    assert kd_loss(S, T_LOGITS, "hard").item() == pytest.approx(expected, 1e-6)
    assert kd_loss(S, T_LOGITS, "hard", temperature=5.0).item() == pytest.approx(expected, 1e-6)


def test_multilabel_terms_use_one_sigmoid_per_label():
    s, t = torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0, -2.0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # Hard: BCE on the teacher's decisions [1, 0]: mean(ln(1 + e^-1), ln(1 + e^-1)).
    assert kd_loss(s, t, "hard", multilabel=True).item() == pytest.approx(math.log(1 + 1 / E))
    # Soft, T = 1: BCE with the teacher's probabilities as targets.
    p, q = [sig(3.0), sig(-2.0)], [sig(1.0), sig(-1.0)]
    bce = (
        -sum(pi * math.log(qi) + (1 - pi) * math.log(1 - qi) for pi, qi in zip(p, q, strict=True))
        / 2
    )
    assert kd_loss(s, t, "soft", multilabel=True).item() == pytest.approx(bce, 1e-6)


def test_alpha_mixes_the_label_and_teacher_terms():
    ce_label = math.log(1 + E**-2)  # label 0 on s = [2, 0]
    ce_teacher = math.log(1 + E**2)  # teacher's class 1
    for alpha in (0.0, 0.25, 1.0):
        loss = distillation_loss(S, Y, T_LOGITS, F.cross_entropy, alpha, "hard")
        expected = (1 - alpha) * ce_label + alpha * ce_teacher
        assert loss.item() == pytest.approx(expected, 1e-6)


def test_deit_pairs_send_the_class_head_to_labels_and_the_dist_head_to_the_teacher():
    # cls = [2, 0] agrees with label 0, dist = [0, 2] agrees with the teacher's class 1.
    loss = distillation_loss((S, T_LOGITS), Y, T_LOGITS, F.cross_entropy, 0.5, "hard")
    assert loss.item() == pytest.approx(math.log(1 + E**-2), 1e-6)
    swapped = distillation_loss((T_LOGITS, S), Y, T_LOGITS, F.cross_entropy, 0.5, "hard")
    assert swapped.item() == pytest.approx(math.log(1 + E**2), 1e-6)


def save_teacher(module: ViTClassifier, run_dir: Path, metrics: dict | None = None) -> Path:
    """A medvit-like teacher run folder holding ``checkpoints/best.ckpt`` of ``module``."""
    path = run_dir / runs.CHECKPOINT_DIR / "best.ckpt"
    path.parent.mkdir(parents=True)
    (run_dir / runs.CONFIG_FILE).write_text("model: {}\n")
    if metrics is not None:
        runs.write_metrics(run_dir, metrics)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def loader(n: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=8)


def test_the_teacher_stays_frozen_in_eval_and_sees_the_students_batches(tmp_path: Path):
    teacher_module = ViTClassifier(**DATA, **TEACHER)
    path = save_teacher(teacher_module, tmp_path / "teacher", {"test": {"auroc": 0.9}})
    student = ViTClassifier(
        **DATA, **STUDENT, model_name="deit_tiny_distilled_patch16_224", teacher=str(path)
    )
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    student.net.register_forward_hook(
        lambda m, args, out: seen["student"].append(args[0]) if m.training else None
    )
    trainer = L.Trainer(**short_trainer_kwargs(2, limit_val_batches=0))
    trainer.fit(student, train_dataloaders=loader())
    teacher = student.teacher
    assert isinstance(teacher, Teacher)
    assert not teacher.net.training, "trainer.fit's train() calls reached the teacher"
    assert not any(p.requires_grad for p in teacher.net.parameters())
    for key, value in teacher_module.state_dict().items():
        if key.startswith("net."):
            torch.testing.assert_close(teacher.net.state_dict()[key[4:]], value, rtol=0, atol=0)
    # The teacher is not part of the student: not saved with it, not optimised.
    assert not any(k.startswith("teacher") for k in student.state_dict())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.net.parameters()}
    # Same batches: 2 epochs x 2 batches, each seen by both networks.
    assert teacher.steps == 4 and len(seen["student"]) == 4
    info = student.teacher_info
    assert info["checkpoint"] == str(path.resolve()) and info["ms_per_step"] > 0
    assert info["model_name"] == "lcnet_035" and info["test_metrics"] == {"auroc": 0.9}
    assert info["setting"]["model_name"] == "lcnet_035" and info["setting"]["img_size"] == 28


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_the_teacher_sees_the_same_augmented_batch(tmp_path: Path):
    path = save_teacher(ViTClassifier(**DATA, **TEACHER), tmp_path / "teacher")
    student = ViTClassifier(**DATA, **STUDENT, teacher=str(path), distill_type="soft")
    student.setup("fit")
    inputs = {}
    student.net.register_forward_hook(lambda m, a, o: inputs.__setitem__("student", a[0]))
    student.teacher.net.register_forward_hook(lambda m, a, o: inputs.__setitem__("teacher", a[0]))
    x = torch.randn(4, 1, 28, 28)
    student.training_step((x, torch.tensor([0, 1, 0, 1]), torch.arange(4)), 0)
    assert inputs["student"] is x and inputs["teacher"] is x


def test_a_teacher_normalised_otherwise_gets_its_own_normalisation(tmp_path: Path):
    # e.g. a pretrained teacher trained on ImageNet statistics, a student on 0.5 / 0.5.
    path = save_teacher(ViTClassifier(**DATA, **TEACHER), tmp_path / "teacher")
    ckpt = torch.load(path, weights_only=True)
    ckpt["datamodule_hyper_parameters"] = {"mean": [0.2], "std": [0.3]}
    torch.save(ckpt, path)
    student = ViTClassifier(**DATA, **STUDENT, teacher=str(path))
    student.setup("fit")
    seen = {}
    student.teacher.net.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
    pixels = torch.rand(2, 1, 28, 28)
    student.teacher((pixels - 0.5) / 0.5)  # the student's batch
    torch.testing.assert_close(seen["x"], (pixels - 0.2) / 0.3)
    assert student.teacher.record["input_renormalised"] is True


def test_a_deit_student_averages_its_two_heads_at_evaluation(tmp_path: Path):
    path = save_teacher(ViTClassifier(**DATA, **TEACHER), tmp_path / "teacher")
    student = ViTClassifier(
        **DATA, **STUDENT, model_name="deit_tiny_distilled_patch16_224", teacher=str(path)
    )
    student.setup("fit")
    x = torch.randn(3, 1, 28, 28)
    net = student.net.train()
    cls, dist = net(x)  # training: both heads
    assert cls.shape == dist.shape == (3, 2)
    student.eval()
    with torch.no_grad():
        tokens = net.forward_features(x)
        expected = (net.head(tokens[:, 0]) + net.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(student(x), expected)


def test_teacher_problems_name_each_difference_in_one_line():
    hp = dict(num_classes=7, task="multiclass", in_chans=3, img_size=64)
    problems = teacher_problems(hp, DATA)
    assert problems == [
        "the teacher's classes is 7 but the data's is 2",
        "the teacher's task is 'multiclass' but the data's is 'binary'",
        "the teacher's input channels is 3 but the data's is 1",
        "the teacher's image size (px) is 64 but the data's is 28",
    ]
    names = teacher_problems({**DATA, "class_names": ["x", "y"]}, DATA)
    assert names == ["the teacher's classes are ['x', 'y'] but the data's are ['a', 'b']"]
    assert teacher_problems(dict(DATA), DATA) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distill_alpha": 1.5}, r"distill_alpha must lie in \[0, 1\]"),
        ({"distill_type": "warm"}, "distill_type must be one of"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
    ],
)
def test_bad_distillation_options(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        ViTClassifier(**DATA, **STUDENT, **kwargs)


def test_a_missing_or_foreign_teacher_fails_before_training(tmp_path: Path):
    student = ViTClassifier(**DATA, **STUDENT, teacher=str(tmp_path / "nope.ckpt"))
    with pytest.raises(CheckpointError, match="teacher checkpoint .*nope.ckpt' does not exist"):
        student.setup("fit")
    other = ViTClassifier(
        **{**DATA, "num_classes": 3, "task": "multiclass", "class_names": None}, **TEACHER
    )
    path = save_teacher(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not fit the data: the teacher's classes is 3"):
        ViTClassifier(**DATA, **STUDENT, teacher=str(path)).setup("fit")


def test_medvit_distill_refuses_a_bad_teacher_in_one_line(tmp_path, synthetic_root, capsys):
    root = synthetic_root("dermamnist")  # 7 classes, RGB
    path = save_teacher(ViTClassifier(**DATA, **TEACHER), tmp_path / "teacher")
    base = ["--data.flag=dermamnist", f"--data.root={root}", f"--run.root={tmp_path / 'runs'}"]
    base += short_trainer_args(1)
    for teacher, match in (
        (tmp_path / "missing.ckpt", "missing.ckpt' does not exist"),
        (path, "the teacher's classes is 2 but the data's is 7; the teacher's task is 'binary'"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["distill", *base, "--teacher", str(teacher)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("medvit: error: ") and match in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists(), "a run folder was made before the teacher check"
    with pytest.raises(SystemExit):
        main(["distill", *base])
    assert "needs --teacher CKPT" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_on_real_breastmnist_records_its_teacher(real_data: Path, tmp_path: Path):
    common = [
        "-c",
        "configs/experiment/breastmnist.yaml",
        f"--data.root={real_data}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        *short_trainer_args(1, train_batches=4, val_batches=2, verify_md5=True, patch_size=None),
    ]
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    main(
        ["fit", *common, "--model=configs/model/resnet18_teacher.yaml", f"--run.dir={teacher_dir}"]
    )
    best = teacher_dir / "checkpoints" / "best.ckpt"
    main(
        [
            "distill",
            *common,
            "--model=configs/model/deit_tiny_distilled.yaml",
            "--model.patch_size=7",
            f"--run.dir={student_dir}",
            "--teacher",
            str(best),
        ]
    )
    meta = json.loads((student_dir / runs.META_FILE).read_text())
    assert meta["teacher"]["checkpoint"] == str(best.resolve())
    assert meta["teacher"]["model_name"] == "resnet18" and meta["teacher"]["ms_per_step"] > 0
    assert meta["teacher"]["test_metrics"] == runs.read_metrics(teacher_dir)["test"]
    assert "auroc" in runs.read_metrics(student_dir)["test"]
    config = yaml.safe_load((student_dir / runs.CONFIG_FILE).read_text())
    assert config["model"]["teacher"] == str(best)
    # The student's checkpoint is an ordinary one: it loads and tests without its teacher.
    student_best = student_dir / "checkpoints" / "best.ckpt"
    test_dir = tmp_path / "test"
    main(
        ["test", "-c", str(student_dir / runs.CONFIG_FILE), f"--ckpt_path={student_best}"]
        + [f"--run.dir={test_dir}", f"--data.cache_dir={tmp_path / 'cache'}"]
    )
    assert "auroc" in runs.read_metrics(test_dir)["test"]


def test_cv_distils_each_fold_from_the_same_fold_of_the_teacher_cv(
    synthetic_root, monkeypatch, tmp_path: Path
):
    from test_cv import FakeFit, _config

    from medvit import cv
    from medvit.cv import runner

    root = synthetic_root("breastmnist", n=(40, 12, 16))
    monkeypatch.setattr(runner, "resolve_fit_config", lambda args: _config(root))
    teacher_cv, student_cv = tmp_path / "teacher_cv", tmp_path / "student_cv"
    monkeypatch.setattr(runner, "launch", FakeFit())
    assert runner.run_cv(["--cv-dir", str(teacher_cv), "--folds", "2"]) == 0
    best = {n: teacher_cv / "runs" / n / "checkpoints" / "best.ckpt" for n in ("r0-f0", "r0-f1")}
    best["r0-f1"].write_bytes(b"ckpt")
    args = ["--folds", "2", "--teacher-cv", str(teacher_cv)]
    with pytest.raises(ValueError, match="fold r0-f0 has no teacher checkpoint"):
        runner.run_cv(["--cv-dir", str(student_cv), *args])
    best["r0-f0"].write_bytes(b"ckpt")
    with pytest.raises(ValueError, match="other folds than this CV"):
        runner.run_cv(["--cv-dir", str(student_cv), *args, "--seed", "1"])
    # Only the lock file: no folds or config written before the teacher check.
    assert not (student_cv / "cv_config.json").exists() and not (student_cv / "folds.csv").exists()
    fit = FakeFit()
    monkeypatch.setattr(runner, "launch", fit)
    assert runner.run_cv(["--cv-dir", str(student_cv), *args]) == 0
    teachers = {c["run"]: c["cmd"][c["cmd"].index("--model.teacher") + 1] for c in fit.calls}
    assert teachers == {n: str(p.resolve()) for n, p in best.items()}
    with pytest.raises(SystemExit):
        cv.parse_args([*args, "--model.teacher", "x.ckpt"])


@pytest.mark.slow
@pytest.mark.ddp
def test_distill_under_ddp_loads_the_teacher_on_each_rank(synthetic_root, tmp_path: Path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = synthetic_root("breastmnist", n=(32, 16, 16))
    teacher = save_teacher(
        ViTClassifier(**{**DATA, "class_names": ["malignant", "normal, benign"]}, **TEACHER),
        tmp_path / "teacher",
    )
    run_dir = tmp_path / "student"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "medvit", "distill", f"--data.root={root}"]
    cmd += [f"--run.dir={run_dir}", "--teacher", str(teacher), "--trainer.accelerator=cpu"]
    cmd += ["--trainer.devices=2", "--trainer.strategy=ddp", "--model.drop_path_rate=0"]
    cmd += short_trainer_args(1, train_batches=2, val_batches=1)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((run_dir / runs.META_FILE).read_text())
    assert meta["world_size"] == 2 and meta["teacher"]["checkpoint"] == str(teacher.resolve())
    # Each rank ran its own teacher on its own half of every batch.
    assert meta["teacher"]["ms_per_step"] > 0
    assert "auroc" in runs.read_metrics(run_dir)["test"]


def test_freeze_then_unfreeze_keeps_both_deit_heads_trainable():
    from medvit.train.callbacks import ViTFinetuning

    student = ViTClassifier(**DATA, **STUDENT, model_name="deit_tiny_distilled_patch16_224")
    backbone = ViTFinetuning._backbone(student)
    assert student.net.head not in backbone and student.net.head_dist not in backbone
    assert student.net.blocks in backbone
