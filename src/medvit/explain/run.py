"""The work of ``medvit explain`` and ``medvit predict --explain``: maps, overlays, a CSV.

Inputs are collected, decoded and transformed exactly as ``medvit predict`` does (its
:func:`~medvit.evaluate.predict.load_model`, :func:`~medvit.evaluate.predict_inputs.collect`
and dataset); everything that can be wrong with the request (method, target class, a network
without attention, npz images of another size or channel count) fails before any image is
explained, and a file that cannot be read only gets an ``error`` in its CSV row.
"""

from __future__ import annotations

import csv
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medvit.explain.explainer import Explainer, check_method
from medvit.explain.overlay import caption, display_image, write_overlay
from medvit.fileio import atomic_write

#: What ``medvit explain -o DIR`` writes besides the overlays.
CSV_FILE, MAPS_FILE = "explained.csv", "maps.npz"
TARGETS = ("predicted", "true")


def resolve_target(target: str, names: list[str], task: str) -> str | int:
    """``predicted``, ``true`` or the index of a class given by name (or index).

    Raises:
        ValueError: an unknown class, or ``true`` for a multi-label model.
    """
    if target == "predicted":
        return target
    if target == "true":
        if task == "multilabel":
            raise ValueError(
                "--target true is ambiguous for a multi-label model; give a class name."
            )
        return target
    if target in names:
        return names.index(target)
    if target.isdigit() and int(target) < len(names):
        return int(target)
    raise ValueError(
        f"Unknown --target {target!r}; expected predicted, true or one of the checkpoint's "
        f"classes: {', '.join(names)}."
    )


def npz_image_shape(spec: str) -> tuple[str, tuple[int, ...]] | None:
    """``(key, shape)`` of an ``file.npz[:split]`` input's images, read from the header only."""
    path, _, split = (
        spec.partition(":")
        if spec.endswith((":train", ":val", ":test"))
        else (
            spec,
            "",
            "",
        )
    )
    if not path.endswith(".npz") or not Path(path).is_file():
        return None
    key = f"{split or 'test'}_images"
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape = reader(fh)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # collect() says what is wrong with it
    return key, tuple(int(s) for s in shape)


def check_npz_shapes(inputs: list[str], size: int, in_chans: int, spatial_dims: int = 2) -> None:
    """Refuse npz images of another size or channel count than the checkpoint's data.

    Raises:
        ValueError: naming the file, its shape and the expected one.
    """
    want = (size,) * spatial_dims + ((3,) if in_chans == 3 else ())
    for spec in inputs:
        found = npz_image_shape(spec)
        if found is not None and found[1][1:] != want:
            raise ValueError(
                f"{spec}: {found[0]} are {found[1][1:]} images but the checkpoint's data is "
                f"{want} ({size} px, {in_chans} channel{'s' if in_chans > 1 else ''})."
            )


def _truth_name(label: Any, names: list[str], task: str) -> str:
    """The true class's name (``;``-joined present labels for multi-label); blank if unknown."""
    if label is None:
        return ""
    values = np.ravel(label)
    if task == "multilabel":
        return ";".join(names[k] for k in np.flatnonzero(values) if k < len(names))
    return names[int(values[0])] if 0 <= int(values[0]) < len(names) else ""


def _file_stem(source: str, i: int) -> str:
    stem = Path(source.split(":")[0]).stem + ("_" + source.split(":")[1] if ":" in source else "")
    return f"{i:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60]}"


def explain_dataset(
    explainer: Explainer,
    dataset: Dataset,
    sources: list[str],
    labels: list[Any],
    names: list[str],
    out_dir: str | Path,
    target: str | int = "predicted",
    probabilities: Any = None,
    display: tuple[Any, Any] = (None, None),
    batch_size: int = 32,
    device: str = "cpu",
    task: str = "",
) -> list[dict[str, Any]]:
    """Explain every item of ``dataset`` (``(image, error, i)`` as predict's); write the files.

    Writes ``out_dir``: one overlay PNG per readable input, ``maps.npz`` (``maps`` float16
    ``(N, *spatial)``, NaN where unreadable; ``source``, ``index``, ``target``) and
    ``explained.csv`` (one row per input, ``error`` says why one was not explained).

    Args:
        target: ``predicted``, ``true`` or a class index (see :func:`resolve_target`).
        probabilities: logits -> probabilities (the model's own); softmax when None.
        display: the data's ``(mean, std)``, to show the images as they were.
        task: the model's task (``multilabel`` labels are 0/1 per class).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = probabilities or (lambda z: z.softmax(1))
    rows: list[dict[str, Any]] = []
    maps: dict[int, np.ndarray] = {}
    loader = DataLoader(dataset, batch_size=batch_size)
    for x, errors, index in tqdm(loader, desc="explain", disable=len(loader) < 5):
        errors = list(errors)
        truth = [labels[i] for i in index.tolist()]
        if target == "true":
            errors = [
                e or ("" if t is not None else "no true label to explain")
                for e, t in zip(errors, truth, strict=True)
            ]
        ok = [k for k, e in enumerate(errors) if not e]
        result = None
        if ok:
            xs = x[ok].to(device)
            wanted = None
            if target == "true":
                wanted = torch.tensor([int(np.ravel(truth[k])[0]) for k in ok])
            elif isinstance(target, int):
                wanted = torch.full((len(ok),), target)
            result = explainer(xs, wanted)
            probs = probabilities(result.logits).float().cpu().numpy()
            heat = result.maps.cpu().numpy()
        for k, (i, error) in enumerate(zip(index.tolist(), errors, strict=True)):
            true = _truth_name(truth[k], names, task)
            row: dict[str, Any] = {"source": sources[i], "index": i, "method": explainer.method}
            row.update(prediction="", probability="", target="", label_name=true, overlay="")
            if not error:
                j = ok.index(k)
                p, t = probs[j], int(result.targets[j])
                predicted = names[int(p.argmax())]
                row.update(prediction=predicted, probability=round(float(p.max()), 6))
                row["target"] = names[t]
                name = _file_stem(sources[i], i) + ".png"
                title = caption(predicted, float(p.max()), true or None, names[t])
                image = display_image(x[k].numpy(), *display)
                write_overlay(out_dir / name, image, heat[j], f"{sources[i]} [{i}]\n{title}")
                row["overlay"] = name
                maps[i] = heat[j].astype(np.float16)  # as maps.npz stores them
            else:
                print(f"medvit explain: skipped {sources[i]}: {error}", file=sys.stderr)
            row["error"] = error
            rows.append(row)
    _write_outputs(out_dir, rows, maps)
    return rows


def _write_outputs(out_dir: Path, rows: list[dict[str, Any]], maps: dict[int, np.ndarray]) -> None:
    shape = next(iter(maps.values())).shape if maps else (0,)
    stack = np.full((len(rows), *shape), np.nan, np.float16)
    for n, row in enumerate(rows):
        if row["index"] in maps:
            stack[n] = maps[row["index"]]
    with atomic_write(out_dir / MAPS_FILE, "wb") as fh:
        np.savez_compressed(
            fh,
            maps=stack,
            source=np.array([r["source"] for r in rows], dtype=str),
            index=np.array([r["index"] for r in rows]),
            target=np.array([r["target"] for r in rows], dtype=str),
        )
    with atomic_write(out_dir / CSV_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(1 for r in rows if r["error"])
    print(
        f"Explained {len(rows) - failed} of {len(rows)} inputs into {out_dir} "
        f"({CSV_FILE}, {MAPS_FILE}, overlays)",
        file=sys.stderr,
    )


def explain(
    ckpt_path: str | Path,
    inputs: list[str],
    output: str | Path,
    method: str = "grad_rollout",
    target: str = "predicted",
    batch_size: int = 32,
    device: str = "auto",
    force: bool = False,
    window: tuple[float, float] | None = None,
    fusion: str = "mean",
    discard_ratio: float = 0.9,
) -> list[dict[str, Any]]:
    """``medvit explain``: maps of a checkpoint's predictions for images, folders or npz splits.

    Args:
        ckpt_path: a ``.ckpt`` written by ``medvit fit``.
        inputs: as ``medvit predict``'s (files, folders, CSV/TSV listings, ``file.npz[:split]``).
        output: the folder for overlays, ``maps.npz`` and ``explained.csv``.
        method: ``rollout``, ``grad_rollout`` or ``gradcam``.
        target: ``predicted``, ``true`` or a class name.
        fusion, discard_ratio: rollout's head fusion and discard ratio.

    Returns:
        The CSV's rows.

    Raises:
        ValueError: (before any image is explained) an unknown method or class, a checkpoint
            without attention layers, npz images of another size or channel count, or any of
            ``medvit predict``'s input errors.
    """
    from medvit.evaluate.input_dataset import input_dataset
    from medvit.evaluate.predict import check_inputs_fit_checkpoint, load_model
    from medvit.evaluate.predict_inputs import COLUMN_OPTIONS, collect, decoding_for

    check_method(method, fusion, discard_ratio)
    model, data_hp = load_model(ckpt_path)
    hp = model.hparams
    explainer = Explainer(model, method, fusion, discard_ratio)  # refuses a CNN
    names = list(hp.class_names or [str(i) for i in range(hp.num_classes)])
    wanted = resolve_target(target, names, hp.task)
    decoding = decoding_for(hp, data_hp, window)
    spatial_dims = int(getattr(hp, "spatial_dims", 2) or 2)
    check_npz_shapes(inputs, decoding.size, decoding.in_chans, spatial_dims)
    named = {k: data_hp[k] for k in COLUMN_OPTIONS if isinstance(data_hp.get(k), str)}
    items = collect(inputs, decoding, hp.task, names, force, named)  # listings as in training
    labels = [item.label for item in items]
    if not force:
        check_inputs_fit_checkpoint(ckpt_path, data_hp, hp, inputs, labels)
    if wanted == "true" and all(label is None for label in labels):
        raise ValueError(
            "--target true needs labelled inputs (an npz split, class subfolders or a "
            "listing's label column); these have no labels."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device)
    mean, std = data_hp.get("mean") or [0.5], data_hp.get("std") or [0.5]
    return explain_dataset(
        explainer,
        input_dataset(items, decoding, hp.img_size, hp.in_chans, mean, std),
        [item.source for item in items],
        labels,
        names,
        output,
        wanted,
        model.probabilities,
        (mean, std),
        batch_size,
        device,
        hp.task,
    )
