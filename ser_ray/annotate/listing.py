"""What an archive holds: every file under a local directory or ``s3://`` prefix."""

from __future__ import annotations

from pathlib import Path

from ser_ray import storage


def _norm(uri: str) -> str:
    uri = str(uri)
    if storage.is_s3(uri):
        return uri.rstrip("/")
    return str(Path(uri).expanduser().absolute()).rstrip("/")


def list_archive(input_uri: str, output_uri: str | None = None) -> list[str]:
    """Every file under ``input_uri``, sorted; files under ``output_uri`` are left out.

    All files are listed, audio or not, so that a non-audio file still gets an error row.
    """
    uris = storage.list_files(input_uri)
    if output_uri:
        out = _norm(output_uri) + "/"
        uris = [u for u in uris if not _norm(u).startswith(out)]
    return uris
