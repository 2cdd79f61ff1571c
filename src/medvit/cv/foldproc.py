"""Entry point of one ``medvit cv`` fold: ``python -m medvit.cv.foldproc fit ...``.

A fold is ``medvit fit`` that dies with its parent. When ``medvit cv`` is killed with
``kill -9`` it cannot stop its child, and a fold left training under PID 1 would race a rerun
on the same folder. So, before anything heavy is imported:

- on Linux the kernel is asked to SIGKILL this process when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``);
- the parent may already have died before that call: then the process exits at once;
- a watchdog thread checks the parent PID every second, for systems without prctl.

DDP ranks started by Lightning rerun this module; each one dies with the rank that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "MEDVIT_FOLD_PARENT"
_PR_SET_PDEATHSIG = 1


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(interval: float = 1.0) -> None:
    """Make this process end when its parent (``$MEDVIT_FOLD_PARENT``, else the current one) does.

    The variable is removed so that processes this one starts (DDP ranks) watch their own
    parent, this process.
    """
    expected = os.environ.pop(PARENT_ENV, None)
    parent = int(expected) if expected else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(128 + signal.SIGKILL)
    threading.Thread(
        target=_watch, args=(parent, interval), name="medvit-parent-watchdog", daemon=True
    ).start()


def main() -> None:
    """Arm :func:`die_with_parent`, then run the ``medvit`` command line."""
    die_with_parent()
    from medvit.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
