"""Write a folder all or nothing: fill a temporary sibling, then rename it into place.

Shared by every exporter (Hugging Face, the numpy engine's model folder). Imports only the
standard library, so the numpy-only inference package can use it where JAX is absent.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


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
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); exports are meant to be shared
        yield tmp
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
