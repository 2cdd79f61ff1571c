"""wandb logging, read back from the offline run: config, history, summary, media, artifacts."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import short_trainer_args
from PIL import Image

from medvit.cli import main
from medvit.train.wandb_logging import REDACTED, WandbTestMedia, redact_paths

ROOT = Path(__file__).resolve().parents[1]
QUICK = short_trainer_args(2, train_batches=2, val_batches=2)


# ------------------------------------------------------------------------- offline run reader
def read_records(path: Path):
    """Records of a ``.wandb`` file: wandb's LevelDB-style log of ``wandb_internal_pb2.Record``.

    wandb >= 0.18 has no Python reader (the writer is wandb-core, in Go), so this follows the
    format: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks with
    a 7-byte header (crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a wandb transaction log"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _items(items) -> dict:
    """``{key: value}`` of record items; media and tables come as nested keys (key, field)."""
    out: dict = {}
    for item in items:
        value = json.loads(item.value_json)
        if item.key:
            out[item.key] = value
            continue
        *parents, last = item.nested_key
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> SimpleNamespace:
    """History rows, summary, config and artifacts of the one offline wandb run in ``run_dir``."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    # wandb-core writes the log in the background: wait for the run's exit record.
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{log} has no exit record after {timeout}s"
        time.sleep(0.5)
    history, summary, config, artifacts, environment = [], {}, {}, [], []
    group = None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group = record.run.run_group
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "environment":
            environment.append(record.environment)
    return SimpleNamespace(
        dir=offline,
        history=history,
        summary=summary,
        config=config,
        artifacts=artifacts,
        environment=environment,
        group=group,
    )


def _fit(tmp_path: Path, root: Path, name: str, *extra: str) -> Path:
    run_dir = tmp_path / name
    main(
        [
            "fit",
            "--data.flag=breastmnist",
            f"--data.root={root}",
            f"--run.dir={run_dir}",
            "--wandb.enabled=true",
            "--wandb.mode=offline",
            *QUICK,
            *extra,
        ]
    )
    import wandb

    # The logger leaves the run open (a CLI process finishes it at exit); flush it to disk.
    wandb.finish()
    return run_dir


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    # Artifact staging copies go under tmp, not ~/.local/share/wandb.
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


# ------------------------------------------------------------------------------------ tests
def test_offline_run_logs_config_curves_test_media_and_checkpoint(
    offline, synthetic_root, tmp_path
):
    root = synthetic_root("breastmnist", n=(24, 16, 20), learnable=False)
    run_dir = _fit(
        tmp_path, root, "with-media", "--wandb.log_model=true", "--wandb.log_predictions=true"
    )
    run = read_offline_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # Resolved config: the CLI config nested, plus the model/data hparams; paths redacted.
    assert run.config["model"]["lr"] == 5e-4  # the recipe default
    assert run.config["trainer"]["max_epochs"] == 2
    assert run.config["data"]["flag"] == "breastmnist"
    assert run.config["data"]["root"] == REDACTED
    assert run.config["run"]["dir"] == REDACTED
    assert str(root) not in json.dumps(run.config) and str(tmp_path) not in json.dumps(run.config)
    assert run.config["meta"]["accelerator"] == "cpu" and "host" not in run.config["meta"]
    # Nowhere in the run: wandb's own metadata (which records the command line) is off.
    assert not run.environment
    logged = b"".join(p.read_bytes() for p in run.dir.rglob("*") if p.is_file())
    assert str(root).encode() not in logged

    # Per-epoch curves: loss, AUROC, accuracy and learning rate, one value per epoch.
    keys = set().union(*run.history)
    for key in ("train/loss_epoch", "val/loss", "val/auroc", "val/acc"):
        assert key in keys, key
    lr_keys = [k for k in keys if k.startswith("lr-")]
    assert lr_keys
    assert len([h for h in run.history if "val/auroc" in h]) == 2
    # Test metrics reach the summary with the values metrics.json has.
    for name, value in metrics["test"].items():
        assert run.summary[f"test/{name}"] == pytest.approx(value, abs=1e-6), name

    # Test media: images of the plots (files on disk), the interactive confusion matrix.
    media = [h for h in run.history if "test/roc" in h]
    assert len(media) == 1, [sorted(h) for h in run.history]
    row = media[0]
    for key in ("confusion_matrix", "confusion_matrix_normalized", "roc", "pr", "reliability"):
        image = row[f"test/{key}"]
        assert image["_type"] == "image-file"
        png = run.dir / "files" / image["path"]
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
            assert len(set(im.convert("L").getdata())) > 10, f"{key} looks blank"
    assert row["test/confusion_matrix_table_table"]["_type"] == "table-file"

    # Native line plots of the same curves, which wandb can overlay across runs and folds.
    tables = {
        name: json.loads(Path(e.local_path).read_text())
        for a in run.artifacts
        if a.type == "run_table"
        for name in ("roc_curve", "pr_curve", "reliability_curve")
        if name in a.name
        for e in a.manifest.contents
        if e.path.endswith(".table.json")
    }
    assert set(tables) == {"roc_curve", "pr_curve", "reliability_curve"}
    for name in tables:
        assert row[f"test/{name}_table"]["_type"] == "table-file"
    roc = tables["roc_curve"]
    assert roc["columns"] == ["step", "lineKey", "lineVal"]
    # One line, the positive class (malignant), labelled with the run's test AUROC.
    assert {r[1] for r in roc["data"]} == {f"malignant (AUC {metrics['test']['auroc']:.3f})"}
    assert run.group == ""  # a single run is in no group (medvit cv sets one for its folds)

    # The opt-in table: misclassified test images, identified by split and index only. Tables
    # travel as "run_table" artifacts (the JSON and its images), staged for `wandb sync`.
    assert row["test/misclassified"]["_type"] == "table-file"
    (table_artifact,) = [
        a for a in run.artifacts if a.type == "run_table" and "misclassified" in a.name
    ]
    files = {e.path: Path(e.local_path) for e in table_artifact.manifest.contents}
    (table_json,) = [p for name, p in files.items() if name.endswith(".table.json")]
    table = json.loads(table_json.read_text())
    assert table["columns"] == [
        "split",
        "index",
        "thumbnail",
        "label",
        "prediction",
        "probabilities",
    ]
    with np.load(run_dir / "test_predictions.npz") as npz:
        probs, target, index = npz["probs"], npz["target"].astype(int), npz["index"]
        names = [str(n) for n in npz["class_names"]]
    wrong = index[probs.argmax(1) != target]
    assert len(wrong) > 0
    assert [r[1] for r in table["data"]] == wrong.tolist()[:100]
    for split, idx, thumb, label, pred, prob_text in table["data"]:
        i = int(np.flatnonzero(index == idx)[0])
        assert split == "test"
        assert (label, pred) == (names[target[i]], names[int(probs[i].argmax())])
        expected = dict(zip(names, probs[i].round(4).tolist(), strict=True))
        assert json.loads(prob_text) == pytest.approx(expected, abs=1e-4)
        with Image.open(files[thumb["path"]]) as im:
            assert im.size == (28, 28) and im.mode == "L"
    # No file paths in the table (thumbnails are referenced by content hash).
    assert str(root) not in table_json.read_text()

    # The best checkpoint (only) as a model artifact, stored offline for `wandb sync`.
    (model,) = [a for a in run.artifacts if a.type == "model"]
    assert set(model.aliases) == {"best", "latest"}
    assert [e.path for e in model.manifest.contents] == ["model.ckpt"]
    assert json.loads(model.metadata)["original_filename"] == "best.ckpt"
    staged = Path(model.manifest.contents[0].local_path)
    assert staged.stat().st_size == (run_dir / "checkpoints" / "best.ckpt").stat().st_size


def test_predictions_table_and_checkpoint_are_off_by_default(offline, synthetic_root, tmp_path):
    root = synthetic_root("breastmnist", n=(24, 16, 20), learnable=False)
    run_dir = _fit(tmp_path, root, "default")
    run = read_offline_run(run_dir)
    keys = set().union(*run.history)
    assert "test/roc" in keys and "test/reliability" in keys
    assert "test/misclassified" not in keys
    # No checkpoint, and the tables (confusion counts, curve points) carry no images.
    assert {a.type for a in run.artifacts} == {"run_table"}
    assert sorted(e.path for a in run.artifacts for e in a.manifest.contents) == [
        f"test/{name}_table.table.json"
        for name in ("confusion_matrix_table", "pr_curve", "reliability_curve", "roc_curve")
    ]
    images = sorted(p.name.split("_")[0] for p in (run.dir / "files").rglob("*.png"))
    assert images == ["confusion", "confusion", "pr", "reliability", "roc"]


def test_media_callback_is_silent_without_a_wandb_logger():
    from lightning.pytorch.loggers import CSVLogger

    trainer = SimpleNamespace(is_global_zero=True, loggers=[CSVLogger("unused")])
    module = SimpleNamespace(test_predictions={"probs": np.eye(2)})
    WandbTestMedia().on_test_end(trainer, module)  # would fail on the fake module otherwise
    with pytest.raises(ValueError, match="max_images"):
        WandbTestMedia(max_images=-1)


def test_redact_paths_keeps_values_that_are_not_paths():
    config = {
        "data": {"root": "/secure/site-7/patient-123", "flag": "breastmnist", "folds_file": None},
        "model": {"pretrained": False, "lr": 0.001},
        "run": {"dir": "runs/x", "name": "exp"},
        "trainer": {"default_root_dir": "/x"},
    }
    out = redact_paths(config)
    assert out["data"] == {"root": REDACTED, "flag": "breastmnist", "folds_file": None}
    assert out["model"] == {"pretrained": False, "lr": 0.001}
    assert out["run"] == {"dir": REDACTED, "name": "exp"}
    assert out["trainer"]["default_root_dir"] == REDACTED
    assert redact_paths({"pretrained": "/w/vit.safetensors"}) == {"pretrained": REDACTED}


def test_sweep_config_passes_args_to_medvit_fit():
    sweep = yaml.safe_load((ROOT / "configs" / "sweep" / "breastmnist.yaml").read_text())
    command = sweep["command"]
    assert command[command.index("fit") + 1 :][-1] == "${args}"
    assert sweep["metric"] == {"name": "val/auroc_best", "goal": "maximize"}
    assert sweep["method"] in ("grid", "random", "bayes")
    for key in sweep["parameters"]:
        assert key.split(".")[0] in ("model", "data", "trainer"), key


class _Volumes:
    """A test split of (1, D, H, W) volumes, normalised with mean 0.5 and std 0.5."""

    def __init__(self, n: int, shape: tuple[int, int, int] = (6, 8, 10)) -> None:
        self.volumes = np.full((n, 1, *shape), 0.3, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int):
        return (self.volumes[i] - 0.5) / 0.5, 0, i


def test_3d_test_media_log_slice_thumbnails_and_the_gallery_table(offline, tmp_path):
    """Volumes: the misclassified table's thumbnails are mid-slice strips, and the opt-in
    ``test/gallery`` table holds the run's gallery pictures (misclassified and explained)."""
    import wandb

    from medvit import runs
    from medvit.evaluate import case_plots
    from medvit.train.gallery import TestGallery
    from medvit.train.wandb_logging import MedViTWandbLogger

    run_dir = tmp_path / "run3d"
    run_dir.mkdir()
    data = _Volumes(8)
    data.volumes[:, 0, 3, 2, 2] = 1.0  # a bright voxel in every mid axial slice
    target = np.array([0, 1] * 4)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]] * 2)
    module = SimpleNamespace(
        test_predictions={"probs": probs, "target": target, "index": np.arange(8)},
        hparams={"class_names": ["normal", "hyperplasia"], "task": "binary"},
    )
    logger = MedViTWandbLogger(
        save_dir=str(run_dir), offline=True, project="medvit", log_predictions=True
    )
    gallery = TestGallery(max_cases=3)
    trainer = SimpleNamespace(
        is_global_zero=True,
        loggers=[logger],
        callbacks=[gallery],
        log_dir=str(run_dir),
        default_root_dir=str(run_dir),
        test_dataloaders=[SimpleNamespace(dataset=data)],
        datamodule=SimpleNamespace(hparams={"mean": None, "std": None}),
        global_step=5,
    )
    gallery.setup(trainer, module, "test")
    gallery.on_test_end(trainer, module)
    # An explanation overlay, as the explanation gallery writes it.
    overlay = runs.gallery_image_path(run_dir, "explained", "rollout_00001.png")
    overlay.parent.mkdir(parents=True)
    overlay.write_bytes(case_plots.case_png(np.random.default_rng(0).random((3, 8, 8))))
    explained = {"index": 1, "true": "hyperplasia", "predicted": "hyperplasia"}
    runs.write_gallery(
        run_dir,
        "explained",
        [
            {
                **explained,
                "image": "gallery/explained/rollout_00001.png",
                "probability": 0.8,
                "kind": "correct",
                "method": "rollout",
            }
        ],
    )
    WandbTestMedia().on_test_end(trainer, module)
    wandb.finish()

    run = read_offline_run(run_dir)
    (row,) = [h for h in run.history if "test/roc" in h]
    tables = {
        a.name: {e.path: Path(e.local_path) for e in a.manifest.contents}
        for a in run.artifacts
        if a.type == "run_table"
    }

    def table(key: str) -> tuple[dict, dict]:
        (files,) = [f for name, f in tables.items() if key in name]
        (path,) = [p for name, p in files.items() if name.endswith(".table.json")]
        return json.loads(path.read_text()), files

    # The misclassified table: every wrong case, its thumbnail the mid-slice strip.
    wrong, files = table("misclassified")
    assert [r[1] for r in wrong["data"]] == np.flatnonzero(probs.argmax(1) != target).tolist()
    strip = case_plots.slices_strip(case_plots.denormalize(data[0][0]))
    for r in wrong["data"]:
        with Image.open(files[r[2]["path"]]) as im:
            assert im.size == (strip.shape[1], strip.shape[0]) and im.mode == "L"
            assert np.array_equal(np.asarray(im), strip)
    # The gallery table: one row per gallery entry, misclassified first, with its picture.
    assert row["test/gallery"]["_type"] == "table-file"
    shown, files = table("gallery")
    assert shown["columns"] == [
        "section",
        "kind",
        "index",
        "label",
        "prediction",
        "probability",
        "picture",
        "caption",
    ]
    gallery_files = runs.read_gallery(run_dir)
    expected = [
        (section, e["index"], e["true"], e["predicted"])
        for section in ("misclassified", "explained")
        for e in gallery_files[section]
    ]
    assert [(r[0], r[2], r[3], r[4]) for r in shown["data"]] == expected
    assert len(gallery_files["misclassified"]) == 3
    for r, (section, index, *_) in zip(shown["data"], expected, strict=True):
        (entry,) = [e for e in gallery_files[section] if e["index"] == index]
        with Image.open(files[r[6]["path"]]) as logged, Image.open(run_dir / entry["image"]) as own:
            assert logged.size == own.size
            assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(own.convert("RGB")))
