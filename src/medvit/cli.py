"""The ``medvit`` command (being split: the LightningCLI now lives in ``medvit.train.cli``)."""

from medvit.train.cli import *  # noqa: F403
from medvit.train.cli import __dict__ as _impl

globals().update({k: v for k, v in _impl.items() if not k.startswith("__")})
