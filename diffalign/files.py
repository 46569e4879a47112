"""File-mode helper for weights written by safetensors.

safetensors >= 0.8 writes every file through a temporary file created with mode 0600 and renames it into place
(safetensors issue #782), so weights would be readable by their owner only, unlike every other file a run
writes. :func:`respect_umask` gives them the mode an ordinary new file gets: ``0o666`` masked by the umask.
"""

from __future__ import annotations

import os


def umask() -> int:
    """The process umask (read by setting a restrictive one and restoring it at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def respect_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a ``.safetensors`` file, or every one under a folder) the mode ``0o666 & ~umask``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        files = [path]
    else:
        files = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.endswith(".safetensors")]
    mode = 0o666 & ~umask()
    for file in files:
        os.chmod(file, mode)
