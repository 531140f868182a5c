"""Probing the folders and files of a data root: *missing* is not *unreadable*.

``os.path.isdir`` / ``isfile`` / ``exists`` answer False for a path that is there but cannot be
reached (no search permission on its folder, a symbolic-link loop), so a check built on them
reports "folder missing" for a permission problem. :func:`kind` tells the cases apart and
:func:`os_reason` says why a path could not be read — naming a dangling symbolic link as such
(a file that a listing shows but that cannot be opened). The benchmarks word their
:class:`~mtl_tune.benchmarks.base.DataError` as ``cannot read <path> (<reason>)``
(:func:`cannot_read`). No torch, no package imports: every benchmark's data check uses it.
"""

from __future__ import annotations

import os
import stat

#: ``kind`` results
DIR, FILE, OTHER, MISSING = "dir", "file", "other", "missing"


def _dangling_link(path: str) -> str | None:
    """``path``, or the folder above it, that is a symbolic link to nothing (the first from the
    bottom), if any."""
    current = os.path.abspath(path)
    while True:
        if os.path.islink(current) and not os.path.exists(current):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def os_reason(err: OSError, path: str | None = None) -> str:
    """Why ``path`` (default: the error's file name) could not be read, in words: the system's
    text ("Permission denied", "Too many levels of symbolic links"), or "a broken symbolic link
    to <target>" for a link whose target is not there ("<folder> is a broken symbolic link to
    <target>" when it is a folder above ``path``)."""
    path = path if path is not None else err.filename
    link = _dangling_link(path) if isinstance(err, FileNotFoundError) and isinstance(path, str) else None
    if link is None:
        return err.strerror or str(err)
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    where = "" if link == os.path.abspath(path) else f"{link} is "
    return f"{where}a broken symbolic link to {target}"


def _blocking_folder(path: str) -> str | None:
    """The highest folder above ``path`` that this process may not enter, if any."""
    chain = []
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        chain.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for folder in reversed(chain):  # from the top: "<folder>/." is reachable iff it may be entered
        try:
            os.stat(os.path.join(folder, "."))
        except PermissionError:
            return folder
        except OSError:
            return None
    return None


def cannot_read(path: str, err: OSError) -> str:
    """``cannot read <path> (<reason>)``: the wording every benchmark uses for such a path. A
    permission error caused by a folder above ``path`` names that folder (what to fix)."""
    if isinstance(err, PermissionError):
        path = _blocking_folder(path) or path
    return f"cannot read {path} ({os_reason(err, path)})"


def kind(path: str) -> str:
    """``"dir"``, ``"file"``, ``"other"`` (a device, a socket, …) or ``"missing"``.

    Raises the ``OSError`` when ``path`` is there but cannot be reached: no permission on a
    folder above it, a symbolic-link loop, or a symbolic link to nothing — ``path`` itself or a
    folder above it, a disk that is not mounted, say (``FileNotFoundError``; :func:`os_reason`
    names the link and its target).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if _dangling_link(path) is not None:
            raise
        return MISSING
    except NotADirectoryError:  # a folder above it is a file: the path is not there
        return MISSING
    if stat.S_ISDIR(mode):
        return DIR
    return FILE if stat.S_ISREG(mode) else OTHER
