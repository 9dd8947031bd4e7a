"""Write files and folders all or nothing: fill a temporary sibling, then rename it into place.

The one home for it: every exporter, the data preparation, the shipped fine-tuning files, the
eval and sweep reports. What lands has the usual permissions (0666 / 0777 less the umask, as
`open` gives), not the private 0600 / 0700 that mkstemp / mkdtemp (and libraries writing through
them) leave. Imports only the standard library, so the numpy-only inference package can use it
where JAX is absent.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(path: str) -> None:
    """Give a temporary file or folder (recursively) the permissions `open` would have."""
    mask = _umask()
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary file name beside `path` for a writer that wants a name; on success it
    gets the usual permissions and is renamed onto `path`. On any error it is removed."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    os.close(fd)
    try:
        yield tmp
        _share(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Yields an open file; on success it is flushed to disk and renamed onto `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str, value: Any, **dump_kwargs) -> None:
    """`value` as JSON (json.dump's keyword arguments, indent 1 by default) plus a newline."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(value, f, **dump_kwargs)
        f.write("\n")


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yields a temporary folder to fill; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and deleted only once the new folder is in place
    (and put back if the rename fails). On any error nothing at `path` changes.
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        _share(tmp)  # the folder and whatever the writers left private (safetensors: 0600)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(path, os.path.join(old, name))
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous folder back
                os.replace(os.path.join(old, name), path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
