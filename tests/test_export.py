"""``medvit export`` (ONNX fp32/int8, checks, metadata) and ``medvit predict`` on ``.onnx``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import short_breast_fit

from medvit.cli import main
from medvit.export.metadata import METADATA_KEY, ModelInfo
from medvit.export.onnx_export import (
    PARITY_ATOL,
    ExportError,
    check_model,
    export_onnx,
    parity,
    session,
)


def _info(path: Path) -> ModelInfo:
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    return ModelInfo.from_json(meta[METADATA_KEY])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _one_line_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medvit: error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """best.ckpt of a 2-epoch BreastMNIST run (synthetic file; ViT-Tiny, patch 7, 28 px)."""
    run_dir = short_breast_fit(tmp_path_factory.mktemp("export-fit"))
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def exported(fitted: Path) -> Path:
    """The checkpoint exported by ``medvit export`` (fp32)."""
    out = fitted.parent.parent / "model.onnx"
    main(["export", "--ckpt_path", str(fitted), "--format", "onnx", "-o", str(out)])
    return out


# ------------------------------------------------------------------------------ fp32 export
@pytest.mark.slow
def test_export_writes_a_checked_model_that_carries_what_predict_needs(fitted, exported):
    proto = onnx.load(exported)
    onnx.checker.check_model(proto, full_check=True)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param  # the batch axis is dynamic

    info = _info(exported)
    ckpt = torch.load(fitted, weights_only=True)
    hp, data_hp, state = (
        ckpt["hyper_parameters"],
        ckpt["datamodule_hyper_parameters"],
        ckpt["state_dict"],
    )
    assert info.class_names == ["malignant", "normal, benign"] == hp["class_names"]
    assert (info.task, info.num_classes, info.in_chans, info.img_size) == ("binary", 2, 1, 28)
    assert info.spatial_dims == 2 and info.precision == "fp32"
    assert info.positive_class == 0  # BreastMNIST's malignant, as the run was trained
    assert info.op_threshold == pytest.approx(float(state["op_threshold"]))
    assert info.temperature == pytest.approx(float(state["temperature"]))
    assert (info.mean, info.std) == ([0.5], [0.5])
    assert info.data["flag"] == "breastmnist" and info.data["size"] == 28
    assert info.data["size"] == data_hp["size"]
    assert 0 <= info.checks["parity"]["max_abs_logit_diff"] <= PARITY_ATOL
    # The JSON round trip is exact.
    assert ModelInfo.from_json(info.to_json()) == info

    # Any batch size runs and matches PyTorch.
    from medvit.evaluate.predict import load_model

    module, _ = load_model(fitted)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = module.eval()(x).numpy()
    got = session(exported).run(None, {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() <= PARITY_ATOL


class _Wrapped(torch.nn.Module):
    """A plain timm network as the LightningModule wraps it (forward = the network's)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_export_parity_of_a_tiny_cnn():
    name = "test_resnet"  # timm's tiny ResNet
    torch.manual_seed(0)
    net = _Wrapped(timm.create_model(name, num_classes=3, in_chans=3, pretrained=False)).eval()
    info = ModelInfo("multiclass", 3, ["a", "b", "c"], in_chans=3, img_size=32)
    proto = export_onnx(net, info)
    check_model(proto)
    result = parity(net, proto, info)
    assert result["batches"] == [1, 8]
    assert result["max_abs_logit_diff"] <= PARITY_ATOL


def test_export_refuses_a_model_it_cannot_export_faithfully():
    info = ModelInfo("binary", 2, ["a", "b"], in_chans=1, img_size=16)

    class Noisy(torch.nn.Module):
        """Its output depends on a random draw: ONNX's draws differ from PyTorch's."""

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(16 * 16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + torch.randn_like(x)
            return self.head(x.flatten(1))

    proto = export_onnx(Noisy().eval(), info)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        parity(Noisy().eval(), proto, info)

    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = x.flatten(1)[:, :2]
            return flat, flat

    with pytest.raises(ExportError, match="single-output classifiers"):
        export_onnx(TwoHeads(), info)


@pytest.mark.slow
def test_export_refuses_a_checkpoint_whose_code_has_changed(fitted, tmp_path, capsys):
    ckpt = torch.load(fitted, weights_only=True)
    renamed = dict(ckpt)
    state = dict(ckpt["state_dict"])
    state["net.head.renamed_weight"] = state.pop("net.head.weight")
    renamed["state_dict"] = state
    torch.save(renamed, tmp_path / "renamed.ckpt")
    unknown = dict(ckpt)
    unknown["hyper_parameters"] = {**ckpt["hyper_parameters"], "argument_gone_since": 1}
    torch.save(unknown, tmp_path / "unknown.ckpt")
    for name in ("renamed", "unknown"):
        out = tmp_path / f"{name}.onnx"
        args = ["export", "--ckpt_path", str(tmp_path / f"{name}.ckpt"), "-o", str(out)]
        line = _one_line_error(capsys, args)
        assert "code has changed" in line and f"{name}.ckpt" in line, line
        assert not out.exists() and not list(tmp_path.glob(f".{name}*"))


def test_export_refuses_an_onnx_file_and_a_missing_checkpoint(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    line = _one_line_error(
        capsys, ["export", "--ckpt_path", str(model), "-o", str(tmp_path / "x.onnx")]
    )
    assert "already an ONNX model" in line
    line = _one_line_error(
        capsys, ["export", "--ckpt_path", str(tmp_path / "no.ckpt"), "-o", str(tmp_path / "x.onnx")]
    )
    assert "no.ckpt does not exist" in line


# ------------------------------------------------------------------------------------- int8
def _damaged_for_int8(fitted: Path, out: Path) -> Path:
    """The same fp32 function, but one activation channel before every qkv/fc1 is 10^4 times
    larger (and the weights reading it 10^4 times smaller): per-tensor int8 activations then
    lose every other channel. A deliberately damaged model for the AUC gate."""
    ckpt = torch.load(fitted, weights_only=True)
    state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("net.blocks."))
    for b in range(depth):
        for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            for c in (0, 1):
                state[f"net.blocks.{b}.{norm}.weight"][c] *= 1e4
                state[f"net.blocks.{b}.{norm}.bias"][c] *= 1e4
                state[f"net.blocks.{b}.{linear}.weight"][:, c] /= 1e4
    torch.save({**ckpt, "state_dict": state}, out)
    return out


@pytest.mark.slow
def test_the_int8_gate_refuses_a_damaged_model_unless_forced(fitted, tmp_path, capsys, monkeypatch):
    from medvit.evaluate.predict import load_model
    from medvit.export import onnx_export
    from medvit.export.quantize import QualityGateError, datamodule_for, quantize_checked

    damaged = _damaged_for_int8(fitted, tmp_path / "damaged.ckpt")
    proto, info, _ = onnx_export.export_checkpoint(damaged)  # fp32 parity holds: same function
    dm = datamodule_for(damaged, load_model(damaged)[1])
    with pytest.raises(QualityGateError) as refused:
        quantize_checked(proto, info, "dynamic", dm, report=lambda line: None)
    numbers = str(refused.value).split("test AUC fp32 ")[1]
    before = float(numbers.split(",")[0])
    after = float(numbers.split("int8 dynamic ")[1].split()[0])
    assert before - after > 0.005, str(refused.value)

    # The command refuses to write (one line, both numbers) and --force writes.
    monkeypatch.setattr(onnx_export, "export_checkpoint", lambda path: (proto, info, None))
    out = tmp_path / "damaged.int8.onnx"
    args = ["export", "--ckpt_path", str(damaged), "--int8", "dynamic", "-o", str(out)]
    line = _one_line_error(capsys, args)
    assert f"test AUC fp32 {before:.4f}, int8 dynamic {after:.4f}" in line
    assert "nothing written" in line and "--force" in line
    assert not out.exists() and not list(tmp_path.glob(".damaged*"))
    main([*args, "--force"])
    written = _info(out)
    assert written.precision == "int8-dynamic"
    assert written.checks["int8"]["forced"] is True
    assert written.checks["int8"]["test_auc_fp32"] == pytest.approx(before, abs=1e-4)
    assert written.checks["int8"]["test_auc_int8"] == pytest.approx(after, abs=1e-4)
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_bare_int8_flag_is_static():
    from medvit.export.cli import build_parser

    args = build_parser().parse_args(["--ckpt_path", "a.ckpt", "--int8", "-o", "m.onnx"])
    assert args.int8 == "static" and args.max_auc_drop == 0.005 and not args.force
    assert build_parser().parse_args(["--ckpt_path", "a", "-o", "m.onnx"]).int8 is None


@pytest.mark.slow
def test_static_int8_is_calibrated_on_the_validation_split_and_predicts(
    fitted, exported, tmp_path, real_data
):
    from medvit.evaluate.predict import load_model
    from medvit.export.onnx_export import write_model
    from medvit.export.quantize import datamodule_for, quantize_checked

    lines = []
    dm = datamodule_for(fitted, load_model(fitted)[1])
    # This 2-epoch model is no quality test: the gate is opened.
    int8, info = quantize_checked(
        onnx.load(exported), _info(exported), "static", dm, max_auc_drop=1, report=lines.append
    )
    assert info.precision == "int8-static"
    assert info.checks["int8"]["calibration_images"] == 24  # the run's validation split
    assert info.checks["int8"]["forced"] is False
    assert lines and lines[0].startswith("test AUC fp32 ") and "30 test images" in lines[0]
    check_model(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    out = tmp_path / "model.int8.onnx"
    assert write_model(int8, out) < 0.35 * exported.stat().st_size
    assert _info(out) == info
    csv_out = tmp_path / "int8.csv"
    val = f"{real_data / 'breastmnist.npz'}:val"
    main(["predict", "--ckpt_path", str(out), val, "-o", str(csv_out)])
    rows = _read_csv(csv_out)
    assert len(rows) == 78 and all(r["prediction"] for r in rows)


# ---------------------------------------------------------------------------------- predict
@pytest.mark.slow
def test_predict_on_onnx_equals_predict_on_the_checkpoint(fitted, exported, tmp_path, real_data):
    npz = str(real_data / "breastmnist.npz")  # the official test split: 156 images
    main(["predict", "--ckpt_path", str(fitted), npz, "-o", str(tmp_path / "ckpt.csv")])
    main(["predict", "--ckpt_path", str(exported), npz, "-o", str(tmp_path / "onnx.csv")])
    ckpt_rows, onnx_rows = _read_csv(tmp_path / "ckpt.csv"), _read_csv(tmp_path / "onnx.csv")
    assert len(ckpt_rows) == len(onnx_rows) == 156
    assert list(ckpt_rows[0]) == list(onnx_rows[0])  # the same columns, in the same order
    probs = [c for c in ckpt_rows[0] if c.startswith("prob_")]
    assert probs == ["prob_malignant", "prob_normal, benign"]
    for a, b in zip(ckpt_rows, onnx_rows, strict=True):
        assert {k: a[k] for k in a if k not in probs} == {k: b[k] for k in b if k not in probs}
        for column in probs:
            assert abs(float(a[column]) - float(b[column])) <= 1e-4


@pytest.mark.slow
def test_predict_on_onnx_does_not_import_lightning(exported, tmp_path, real_data):
    out = tmp_path / "p.csv"
    code = (
        "import json, sys\n"
        "from medvit.cli import main\n"
        f"main(['predict', '--ckpt_path', {str(exported)!r}, "
        f"{str(real_data / 'breastmnist.npz') + ':val'!r}, '-o', {str(out)!r}])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' "
        "or m.startswith(('medvit.models', 'medvit.train', 'pytorch_lightning')))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert len(_read_csv(out)) == 78


def test_export_help_does_not_import_torch():
    code = (
        "import sys\nfrom medvit.cli import main\n"
        "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'lightning') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "--int8" in proc.stdout


def test_predict_refuses_an_onnx_model_without_medvit_metadata(tmp_path, capsys):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])],
        "plain",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2])],
    )
    model = tmp_path / "plain.onnx"
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), model
    )
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    line = _one_line_error(capsys, ["predict", "--ckpt_path", str(model), str(image)])
    assert "carries no medvit metadata" in line and "medvit export" in line
    line = _one_line_error(
        capsys, ["predict", "--ckpt_path", str(tmp_path / "no.onnx"), str(image)]
    )
    assert "no.onnx does not exist" in line


@pytest.mark.parametrize("option", ["--ckpt_path", "-c"])
@pytest.mark.parametrize("command", ["fit", "test"])
def test_an_onnx_model_given_to_fit_or_test_is_one_clear_error(command, option, capsys):
    line = _one_line_error(capsys, [command, option, "runs/model.int8.onnx"])
    assert "runs/model.int8.onnx is an ONNX model" in line
    assert "medvit predict --ckpt_path runs/model.int8.onnx" in line


@pytest.mark.slow
def test_the_deploy_benchmark_measures_every_variant(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import deploy
    finally:
        sys.path.remove(str(bench))
    threads = torch.get_num_threads()
    out = tmp_path / "deploy.json"
    args = ["--model", "test_vit", "--img-size", "32", "--patch-size", "16", "--in-chans", "3"]
    result = deploy.main(
        [*args, "--batches", "1", "--threads", "1", "--repeats", "2", "--out", str(out)]
    )
    torch.set_num_threads(threads)  # the script sets its own
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (latency,) = result["latency"].values()
    assert set(latency) == set(deploy.VARIANTS) == set(result["size_bytes"])
    assert all(v["p50_ms"] > 0 and v["n"] == 2 for v in latency.values())
    assert result["parity_max_abs_logit_diff"] <= PARITY_ATOL
    assert result["test_auc"] == {}  # random weights: no AUC
    assert "| onnx int8 static |" in deploy.markdown(result)


@pytest.mark.slow
def test_predict_on_onnx_reports_an_unreadable_file_in_its_row(exported, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    main(["predict", "--ckpt_path", str(exported), str(tmp_path), "-o", str(tmp_path / "p.csv")])
    rows = _read_csv(tmp_path / "p.csv")
    assert [Path(r["source"]).name for r in rows] == ["bad.png", "good.png"]
    bad, good = rows
    assert bad["error"].startswith("cannot read image") and bad["prob_malignant"] == ""
    assert good["error"] == "" and good["prediction"] in ("malignant", "normal, benign")
    probs = float(good["prob_malignant"]) + float(good["prob_normal, benign"])
    assert probs == pytest.approx(1, abs=1e-5)


def test_export_parity_of_a_3d_vit_with_the_conv_stem():
    from medvit.models.vit3d import create_vit3d

    torch.manual_seed(0)
    net = _Wrapped(create_vit3d("test_vit", num_classes=2, img_size=16, stem="conv")).eval()
    info = ModelInfo("binary", 2, ["no", "yes"], in_chans=1, img_size=16, spatial_dims=3)
    proto = export_onnx(net, info)
    check_model(proto)
    shape = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert shape[1:] == [1, 16, 16, 16] and isinstance(shape[0], str)  # (B, C, D, H, W)
    result = parity(net, proto, info)
    assert result["batches"] == [1, 8]
    assert result["max_abs_logit_diff"] <= PARITY_ATOL
