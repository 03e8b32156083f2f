"""Replace a file atomically: every persisted file of meshfed goes through here.

Lives in ``trust/`` only because that is the bottom of the dependency order
(trust <- federation <- sidecar <- gateway <- chaos) and the CA's own state files
need it too; it knows nothing about trust.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers and crashes see the old or the new
    content, never a torn mix.

    The temporary file is created with ``mode`` (enforced with ``fchmod``, whatever the
    umask), never follows a symlink, and is removed if anything fails. With ``durable``
    the data and the directory entry are fsync'd before returning (persisted state);
    without it the write is only atomic (status files rewritten many times a second).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
