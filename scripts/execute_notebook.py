"""Execute notebooks/quickstart.ipynb on the real BreastMNIST and store it with its outputs.

    MEDVIT_DATA_DIR=../shared/data/medmnist .venv/bin/python scripts/execute_notebook.py

The runs go to a temporary folder (the notebook's working directory), not into the repository.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def main() -> None:
    if not os.environ.get("MEDVIT_DATA_DIR"):
        raise SystemExit("set MEDVIT_DATA_DIR to the folder with breastmnist.npz")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory(prefix="medvit-notebook-") as tmp:
        client = nbclient.NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp}}
        )
        client.execute()
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} with outputs")


if __name__ == "__main__":
    main()
