"""benchmarks/explain_faithfulness.py: deletion and insertion curves rank a map that names the
pixels the model reads above a random one, and the script reports its table."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("explain_faithfulness")


def test_deletion_and_insertion_rank_an_oracle_map_above_random():
    bench = load()

    def model(x: torch.Tensor) -> torch.Tensor:  # reads only the 4 x 4 square at (10, 10)
        score = 10 * x[:, 0, 10:14, 10:14].mean((1, 2))
        return torch.stack((torch.zeros_like(score), score), 1)

    x = torch.full((4, 1, 28, 28), -1.0)
    x[:, :, 10:14, 10:14] = 1.0
    oracle = np.zeros((4, 28, 28))
    oracle[:, 10:14, 10:14] = 1
    noise = np.random.default_rng(0).random((4, 28, 28))
    targets = torch.ones(4, dtype=torch.long)
    d_oracle, i_oracle = bench.curves(model, x, oracle, targets, steps=28, sigma=3.0)
    d_random, i_random = bench.curves(model, x, noise, targets, steps=28, sigma=3.0)
    assert (d_oracle < d_random - 0.2).all() and (i_oracle > i_random + 0.2).all()
    assert np.all((d_oracle >= 0) & (i_oracle <= 1))


@pytest.mark.slow
def test_the_script_reports_every_method_and_baseline(real_data, tmp_path):
    out = tmp_path / "faithfulness.json"
    load().main(["--root", str(real_data), "--limit", "8", "--epochs", "1", "--steps", "4"]
                + ["--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    names = [r["map"] for r in report["rows"]]
    assert names == ["rollout", "grad_rollout", "gradcam", "random", "centre_blob"]
    for row in report["rows"]:
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    assert report["test_images"] == 8
