"""The report's "Test cases" gallery of a run folder: the pictures listed in ``gallery/*.json``.

``misclassified`` (written at test time by :mod:`medvit.train.gallery`): the most confident
misclassified test cases, a volume as its mid axial, coronal and sagittal slices.
``explained`` (written by the explanation tools): per class, the most confident correct and
wrong cases with their heat-map overlays, grouped here by true class and kind. Pictures are
embedded as data URIs, so the page stays one self-contained file; nothing here imports torch.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvit import runs
from medvit.report.tables import Note

SECTION_TITLES = {
    "misclassified": "Most confident misclassified test cases",
    "explained": "Explained test cases: the most confident correct and wrong per class",
}
SECTION_NOTES = {
    "misclassified": (
        "Most confident first (multi-label: the largest label error first); at most the "
        "number the run wrote. Images as the model saw them, before normalisation; a volume "
        "as its mid axial, coronal and sagittal slices."
    ),
    "explained": "Heat-map overlays of where the model looked; the method is in each caption.",
}
KIND_TITLES = {"correct": "correct", "wrong": "wrong", "misclassified": "wrong"}


@dataclass
class GalleryItem:
    """One embedded picture and its caption."""

    src: str
    alt: str
    caption: str
    index: int


@dataclass
class GalleryGroup:
    """Pictures under one heading (a true class and kind), or all of a section (no title)."""

    title: str
    items: list[GalleryItem]


@dataclass
class GallerySection:
    """One gallery section (``misclassified`` or ``explained``)."""

    name: str
    title: str
    note: str
    groups: list[GalleryGroup] = field(default_factory=list)


@dataclass
class Gallery:
    """The "Test cases" block of a run: its sections in :data:`runs.GALLERY_SECTIONS` order."""

    sections: list[GallerySection]
    source: str = ""
    kind: str = "gallery"


def data_uri(path: Path) -> str:
    """A picture file as a ``data:`` URI (PNG unless its suffix says otherwise)."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def caption(entry: Mapping[str, Any]) -> str:
    """``#index · true … · predicted … (p = …)``, then the entry's own caption and method.

    An entry caption that already starts with ``#index ·`` (the misclassified section's) is a
    whole caption and replaces that first part.
    """
    head = (
        f"#{entry['index']} · true: {entry['true']} · predicted: {entry['predicted']} "
        f"(p = {float(entry['probability']):.3f})"
    )
    own = str(entry.get("caption") or "")
    whole = own.startswith(f"#{entry['index']} ·")
    text = own if whole else (f"{head} · {own}" if own else head)
    method = entry.get("method")
    if method and str(method) not in text:
        text += f" · {method}"
    return text


def _item(run_dir: Path, section: str, entry: Mapping[str, Any]) -> GalleryItem:
    text = caption(entry)
    return GalleryItem(
        src=data_uri(run_dir / entry["image"]),
        alt=f"{section} test case {entry['index']}: {text}",
        caption=text,
        index=int(entry["index"]),
    )


def _groups(run_dir: Path, section: str, entries: list[dict[str, Any]]) -> list[GalleryGroup]:
    """``misclassified``: one untitled group in the written order. Other sections
    (``explained``): one group per true class and kind, classes in the order they first
    appear, correct before wrong."""
    if section == "misclassified":
        return [GalleryGroup("", [_item(run_dir, section, e) for e in entries])]
    order: dict[tuple[str, str], list[GalleryItem]] = {}
    for entry in entries:
        key = (str(entry["true"]), str(entry.get("kind") or ""))
        order.setdefault(key, []).append(_item(run_dir, section, entry))
    first: dict[str, int] = {}
    for true, _ in order:
        first.setdefault(true, len(first))
    rank = {"correct": 0, "wrong": 1, "misclassified": 1}
    keys = sorted(order, key=lambda k: (first[k[0]], rank.get(k[1], 2), k[1]))
    return [
        GalleryGroup(f"true {t}" + (f" · {KIND_TITLES.get(k, k)}" if k else ""), order[(t, k)])
        for t, k in keys
    ]


def gallery_block(run_dir: Path, source: str = "") -> Gallery | Note:
    """The gallery of a run folder, or a note saying how to get one.

    A gallery file whose entries lack a key of the contract (:func:`runs.write_gallery`) is a
    ValueError naming the folder.
    """
    try:
        return _gallery_block(run_dir, source)
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{run_dir / runs.GALLERY_DIR}: a gallery entry is malformed ({type(err).__name__}: "
            f"{err})."
        ) from err


def _gallery_block(run_dir: Path, source: str) -> Gallery | Note:
    gallery = runs.read_gallery(run_dir)
    sections = []
    for name in runs.GALLERY_SECTIONS:
        if name not in gallery:
            continue
        entries = gallery[name]
        note = SECTION_NOTES.get(name, "")
        if not entries:
            note = (
                "None: every test case was classified correctly."
                if name == "misclassified"
                else "None."
            )
        sections.append(
            GallerySection(
                name=name,
                title=SECTION_TITLES.get(name, name),
                note=note,
                groups=_groups(run_dir, name, entries) if entries else [],
            )
        )
    if not sections:
        return Note(
            f"No pictures of test cases ({runs.GALLERY_DIR}/ in {run_dir}): medvit fit and "
            "medvit test write them when they test."
        )
    return Gallery(sections, source)
