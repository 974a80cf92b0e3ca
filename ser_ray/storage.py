"""Local paths and ``s3://`` URIs behind one small interface.

S3 goes through pyarrow's filesystem (the standard AWS credential chain). An S3-compatible server
(MinIO, moto, Ceph) is reached by setting the standard ``AWS_ENDPOINT_URL`` variable, which boto3
honours as well, so one setting covers every client ser-ray uses.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@functools.lru_cache(maxsize=4)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for this process (endpoint from ``AWS_ENDPOINT_URL`` when set)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_filesystem(os.environ.get("AWS_ENDPOINT_URL"), region)


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or an ``s3://`` URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_and_path(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_and_path(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_parquet(uri: str, frame) -> None:
    """A pandas DataFrame as one Parquet file at ``uri`` (local or ``s3://``), without its index."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str):
    """The pandas DataFrame in the Parquet file at ``uri`` (local or ``s3://``)."""
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(uri)))


def exists(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_tree(uri: str) -> None:
    """Delete a directory (local or ``s3://`` prefix) and everything below it; nothing there is fine."""
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def size(uri: str) -> int:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).size


def join(root: str, *parts: str) -> str:
    root = str(root)
    if is_s3(root):
        return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(root).joinpath(*parts))


def list_files(root: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Every file below ``root`` (recursively), as sorted URIs of the same kind as ``root``.

    ``suffixes`` filters by lower-cased extension (``(".wav", ".flac")``); ``None`` keeps all.
    """
    fs, base = filesystem_and_path(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{root}: no such directory or prefix")
    if info.type == pafs.FileType.File:
        infos = [info]
    elif not is_s3(str(root)):
        # os.walk does not descend into directory symlinks: a link to a parent would list every
        # file again at each level, and two such links would never finish
        infos = [fs.get_file_info(os.path.join(d, f)) for d, _, files in os.walk(base, followlinks=False) for f in files]
    else:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    uris = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        if suffixes and not item.path.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        uris.append("s3://" + item.path if is_s3(str(root)) else item.path)
    return sorted(uris)
