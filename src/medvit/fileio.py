"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file medvit writes that a user or another command reads (``metrics.json``, predictions,
reports, CV summaries, ``folds.csv``, cache records) goes through :func:`atomic_write`: the
bytes go to a temporary file in the same folder, are flushed to disk, and the temporary file is
renamed over the target (``os.replace`` is atomic on POSIX within one file system). When the
write fails (disk full, Ctrl-C, a bug in the caller), the temporary file is removed and the old
file is untouched. A ``kill -9`` can leave a ``.{name}.*.tmp`` file behind, but never a
truncated target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "w",
    encoding: str | None = "utf-8",
    fixed_temp: bool = False,
    **kwargs: Any,
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; rename it over ``path`` on success.

    Args:
        path: the file to (re)place.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: text encoding (ignored in binary mode).
        fixed_temp: use ``.{name}.tmp`` as the temporary file, so that one left by a killed
            process is overwritten by the next write instead of piling up (for large files
            with a single writer, such as checkpoints).
        **kwargs: passed to :func:`open` (e.g. ``newline=""`` for CSV).

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got '{mode}'.")
    path = Path(path)
    # O_EXCL on a random name: no clash with a concurrent writer; mode 0o666 lets the umask
    # decide the permissions, as for a plain open().
    if fixed_temp:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    else:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            fh = os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding}), **kwargs)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
