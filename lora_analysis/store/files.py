"""The one way this project writes a file: a temporary file beside the target, flushed and fsynced, then
renamed over the target, then the directory fsynced. A reader sees the old file or the new one, never
half of one, and a crash or a failed write leaves no temporary file behind.

    atomic_write(path, lambda tmp: save_file(tensors, tmp))     # any writer that takes a path
    atomic_write_text(path, text)
    atomic_write_bytes(path, data)
    atomic_save_tensors(path, {name: tensor})                   # safetensors, contiguous CPU copies

A file that only grows (a run's metrics.csv) is appended to instead, with :func:`append_text`: rewriting
it on every flush would cost O(rows) each time.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path
from typing import Callable

import torch

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """A hidden, unique temporary name in ``path``'s directory (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(3)}{TMP_SUFFIX}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:        # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, fsync it, give it ``mode`` and rename it over ``path``.

    The parent directory must exist. On any error the temporary file is removed and the error re-raised;
    ``path`` is then untouched.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(str(tmp))
        _fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save ``tensors`` as safetensors (detached contiguous CPU copies, cast to ``dtype`` when given)."""
    from safetensors.torch import save_file

    def prepare(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        return (t.to(dtype) if dtype is not None else t).contiguous()

    state = {k: prepare(v) for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", **(metadata or {})}))


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Append ``text`` to ``path`` (created if missing) and fsync it. A failed write is cut back off, so the
    file ends where it ended before: appending the same rows again later cannot double a half line.

    For files that only grow (metrics.csv): the cost is that of ``text``, not of the whole file.
    """
    path = Path(path)
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
    return path
