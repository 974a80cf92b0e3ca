"""Which URIs the Serve endpoint may read: local paths under allowed roots, objects in allowed buckets.

Checked before anything is opened. Local paths are checked twice: lexically (``os.path.normpath``,
no filesystem access, so ``/etc/passwd`` or ``root/../x`` are refused without touching the disk) and
then after ``os.path.realpath`` (so a symlink inside a root that points outside is refused too).

The resolved path is then opened by ``open``: one directory at a time from the root's descriptor,
each step with ``O_NOFOLLOW`` (the resolved path has no symlinks, so one found there was swapped in
after the check: refused), and the file must be a regular file with a single link (a hard link to a
file outside the root looks like any file inside it). The check and the open cannot disagree.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
from typing import BinaryIO

# a scheme like "http://", "file:", "gs://" (a Windows drive "C:" is not a concern on Linux servers)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclasses.dataclass(frozen=True)
class Decision:
    """The verdict on one URI: ``status`` 200 (allowed, read ``path``), 400 (malformed) or 403 (outside)."""

    uri: str
    status: int
    reason: str = ""
    path: str = ""  # what to read when allowed: the realpath for local files, the URI for S3


class AccessPolicy:
    """Allowed local roots (directories) and S3 buckets (``name`` or ``name/prefix``)."""

    def __init__(self, roots: list[str] | tuple[str, ...] = (), buckets: list[str] | tuple[str, ...] = (),
                 allow_hardlinks: bool = False):
        self.allow_hardlinks = allow_hardlinks
        # both spellings of each root: the one the user wrote (normalised) and the resolved one
        self.roots = []
        for root in roots:
            root = os.path.abspath(os.path.expanduser(str(root)))
            self.roots.append((os.path.normpath(root), os.path.realpath(root)))
        self.buckets = [str(b).removeprefix("s3://").strip("/") for b in buckets if str(b).strip("/")]

    def describe(self) -> dict:
        return {"roots": [real for _, real in self.roots], "buckets": list(self.buckets)}

    def check(self, uri) -> Decision:
        if not isinstance(uri, str) or not uri.strip():
            return Decision(str(uri), 400, "not a non-empty string")
        if "\x00" in uri:
            return Decision(uri, 400, "contains a NUL byte")
        if uri.startswith("s3://"):
            return self._check_s3(uri)
        if _SCHEME.match(uri):
            return Decision(uri, 400, "unsupported scheme; send an absolute local path or an s3:// URI")
        if not os.path.isabs(uri):
            return Decision(uri, 400, "relative path; send an absolute path under an allowed root")
        lexical = os.path.normpath(uri)
        if not any(_under(lexical, norm) or _under(lexical, real) for norm, real in self.roots):
            return Decision(uri, 403, "outside the allowed roots")
        try:
            real = os.path.realpath(uri)  # follows symlinks; reads link metadata only, never file content
        except OSError:  # a link vanished while being resolved
            return Decision(uri, 403, "changed while being checked")
        if not any(_under(real, root) for _, root in self.roots):
            return Decision(uri, 403, "resolves (via a symlink) outside the allowed roots")
        return Decision(uri, 200, path=real)

    def open(self, path: str) -> BinaryIO:
        """The allowed local file at ``path`` (a ``Decision.path``), opened without following any link.

        Raises ``PermissionError`` outside the roots, ``OSError(ELOOP)`` when a symlink appeared on
        the path since the check, ``AudioError`` for a non-regular file or one with other hard links.
        """
        from ser_ray.audio.decode import AudioError

        roots = [real for _, real in self.roots if _under(path, real)]
        if not roots or not os.path.isabs(path):
            raise PermissionError(errno.EACCES, "outside the allowed roots")
        root = max(roots, key=len)
        parts = [p for p in os.path.relpath(path, root).split(os.sep) if p not in ("", ".")]
        if not parts or ".." in parts:
            raise PermissionError(errno.EACCES, "outside the allowed roots")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            file_fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        finally:
            os.close(fd)
        info = os.fstat(file_fd)
        name = parts[-1]
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1 and not self.allow_hardlinks:
            os.close(file_fd)
            raise AudioError(f"{name}: has other hard links, which may lead outside the allowed roots; not read",
                             "access_denied")
        from ser_ray.annotate.windows import regular_file

        return regular_file(file_fd, name)

    def _check_s3(self, uri: str) -> Decision:
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key or key.endswith("/"):
            return Decision(uri, 400, "an s3:// URI needs a bucket and an object key")
        # S3 keys are literal, but some clients normalise "..": refuse it rather than guess
        if any(part in ("..", ".") for part in key.split("/")):
            return Decision(uri, 403, "'..' or '.' in an s3 key is not allowed")
        full = f"{bucket}/{key}"
        if not any(full.startswith(allowed + "/") for allowed in self.buckets):
            return Decision(uri, 403, f"bucket {bucket!r} is not an allowed bucket")
        return Decision(uri, 200, path=uri)


def _under(path: str, root: str) -> bool:
    """``path`` is ``root`` itself or inside it (component-wise, so ``/data2`` is not under ``/data``)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # mixing absolute and relative paths
        return False
