"""What every corpus adapter shares: the skip signal and reading a file's duration cheaply."""

from __future__ import annotations

import io
from pathlib import Path

import soundfile as sf

from ser_ray import storage

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class SkipFile(Exception):
    """Raised by an adapter's ``parse`` for a file that is deliberately not a manifest row.

    ``reason`` is a short category (it groups the report); the message says why for this file.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def file_name(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def stem(uri: str) -> str:
    return Path(file_name(uri)).stem


def audio_info(uri: str) -> tuple[float, int]:
    """``(duration_s, sample_rate)`` from the header: local files are not read in full.

    For ``s3://`` the object is fetched (libsndfile needs a seekable file). Raises ``SkipFile``.
    """
    try:
        if storage.is_s3(uri):
            info = sf.info(io.BytesIO(storage.read_bytes(uri)))
        else:
            info = sf.info(uri)
    except Exception as exc:  # soundfile raises several types for bad input
        raise SkipFile("not readable audio", f"{uri}: not a readable audio file (soundfile: {exc})") from None
    if info.frames == 0:
        raise SkipFile("empty audio", f"{uri}: audio has no samples")
    return info.frames / info.samplerate, int(info.samplerate)
