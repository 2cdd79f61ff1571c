"""notebooks/quickstart.ipynb: stored with a real run's outputs, runs top to bottom on the real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _read():
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_with_the_outputs_of_a_run():
    """A reader who opens it online sees a real run's figures and numbers (CI re-runs it below)."""
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    # Executed top to bottom in one kernel, without errors.
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 8
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "positive class: malignant" in text and "val lr 1e-3" in text
    source = "\n".join(c.source for c in code)
    # The Python API, not the CLI; no Trainer or callbacks wired by hand.
    for name in ("api.fit(", "run_a.predictions()", "predict("):
        assert name in source, name
    for name in ("RunRecorder", "ModelCheckpoint", "build_loggers", "L.Trainer"):
        assert name not in source, name


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(real_data, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nb = _read()
    monkeypatch.setenv("MEDVIT_DATA_DIR", str(real_data))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # Curves, ROC, 2 confusion matrices, reliability, compared curves, ROC overlay, thumbnails.
    assert len(images) == 8, [c.source[:40] for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")

    runs = tmp_path / "runs" / "quickstart"
    for name in ("lr_1e-3", "lr_3e-4"):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        assert metrics["epochs_trained"] == 2 and set(metrics["test"]) >= {"auroc", "ece"}
        assert (runs / name / "test_predictions.npz").is_file()
    test_a = json.loads((runs / "lr_1e-3" / "metrics.json").read_text())["test"]
    assert f"'auroc': {round(test_a['auroc'], 4)}" in text
    assert "val lr 1e-3" in text and "test lr 3e-4" in text  # the comparison table
    assert (runs / "report.html").stat().st_size > 100_000

    # Predictions: probabilities printed for the first test images, as in the CSV.
    with open(runs / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 156  # the official BreastMNIST test split
    first = rows[0]
    assert f"malignant: {float(first['prob_malignant']):.3f}" in text
    assert "test image   0  label" in text
