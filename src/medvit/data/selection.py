"""Which DataModule a ``medvit fit|validate|test`` command line selects, and how to name its data.

No torch here: the CLI reads the arguments with it before it builds its parser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medvit.runs import data_name as data_label

__all__ = ["data_class_requested", "data_init_args", "data_label", "describe_training_data"]


def _yaml_names_data_class(path: str, top_level: bool) -> bool:
    """Whether a config file gives ``data`` (or, for a ``--data`` file, itself) a class_path."""
    try:
        content = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError):
        return False  # the parser reports an unreadable config itself
    section = content.get("data") if top_level and isinstance(content, dict) else content
    if isinstance(section, str) and top_level:
        return _yaml_names_data_class(section, top_level=False)
    return isinstance(section, dict) and "class_path" in section


def data_class_requested(argv: list[str]) -> bool:
    """Whether the arguments select a DataModule class: ``--data ImageDataModule``,
    ``--data.class_path ...``, ``--data.help CLASS``, or a config file whose ``data`` has a
    ``class_path``.

    Only then does the CLI parse ``data`` in LightningCLI's subclass mode (config files and
    ``config.yaml`` then hold ``data: {class_path, init_args}``). Otherwise ``data`` is
    MedMNISTDataModule's own arguments, exactly as before own data existed, so every existing
    config, saved run config and ``--data.flag`` works unchanged.
    """
    found = False
    words = [str(w) for w in argv]
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if not eq:
            value = words[i + 1] if i + 1 < len(words) else ""
        if name in ("-c", "--config"):
            found |= _yaml_names_data_class(value, top_level=True)
        elif name in ("--data", "--data.class_path", "--data.help") and value:
            if value.endswith((".yaml", ".yml", ".json")):
                found |= _yaml_names_data_class(value, top_level=False)
            else:
                found = True
    return found


def data_init_args(data_config: Any) -> Any:
    """The DataModule's arguments in a parsed config, in subclass mode or not."""
    if "class_path" in data_config:
        return data_config.get("init_args") or {}
    return data_config


def describe_training_data(
    name: str,
    task: str | None,
    class_names: list[str] | None,
    num_classes: int | None,
    in_chans: int | None,
    img_size: int | None,
) -> str:
    """``breastmnist (binary, 2 classes: 'malignant', 'normal, benign'; 1 channel, 28 px)``."""
    classes = f"{num_classes} classes"
    if class_names:
        classes += ": " + ", ".join(repr(str(n)) for n in class_names)
    channels = f"{in_chans} channel{'s' if in_chans != 1 else ''}"
    return f"{name} ({task}, {classes}; {channels}, {img_size} px)"
