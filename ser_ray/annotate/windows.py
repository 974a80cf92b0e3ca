"""Stream a long recording as fixed windows, in bounded memory whatever its length.

The file is read in blocks with soundfile (an ``s3://`` object is first streamed to an anonymous
temporary file, chunk by chunk, so neither path holds the whole recording in memory). Windows of ``window_s`` start
every ``hop_s``; each is downmixed and resampled to 16 kHz on its own; the last, partial window is
zero-padded.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np
import soundfile as sf

from ser_ray import storage
from ser_ray.audio.decode import AudioError, check_sample_rate, check_samples, fix_length, resample, soundfile_cause

_COPY_CHUNK = 8 * 1024 * 1024
MAX_CHANNELS = 16
MAX_BLOCK_BYTES = 16 * 1024 * 1024  # decoded float32 samples held per read, whatever rate x channels


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int
    frames: int


Opener = Callable[[str], BinaryIO]  # a local path -> an open binary file (Serve: confined to its roots)


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file.

    Opened non-blocking and checked with ``fstat`` on the open descriptor: a FIFO in an archive would
    otherwise block ``open`` forever, and a device (``/dev/zero``) would never end.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    return regular_file(fd, os.path.basename(path))


def regular_file(fd: int, name: str) -> BinaryIO:
    """The open descriptor ``fd`` as a binary file, or ``AudioError`` (fd closed) if not a regular file."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AudioError(f"{name}: not a regular file", "not_a_file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def open_source(uri: str, opener: Opener | None = None) -> Iterator[BinaryIO]:
    """An open binary file for ``uri``: the local file, or an anonymous temp copy of an ``s3://`` object.

    The temp copy has no name on disk (``tempfile.TemporaryFile``), so a killed process leaves nothing
    behind in the temp directory.
    """
    if not storage.is_s3(uri):
        with (opener or open_regular)(uri) as f:
            yield f
        return
    fs, path = storage.filesystem_and_path(uri)
    with tempfile.TemporaryFile(prefix="ser-ray-") as out:
        with fs.open_input_stream(path) as src:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
        out.seek(0)
        yield out


def file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):  # in-memory uploads
        pos = f.seek(0, io.SEEK_END)
        f.seek(0)
        return pos


def open_audio(source: BinaryIO, name: str) -> sf.SoundFile:
    """``sf.SoundFile`` reading the open file ``source``, or ``AudioError`` naming the file and the cause."""
    if file_size(source) == 0:
        raise AudioError(f"{name}: empty file (0 bytes)", "empty")
    try:
        f = sf.SoundFile(source)
    except Exception as exc:  # soundfile raises several types for bad input
        raise AudioError(f"{name}: not a readable audio file (soundfile: {soundfile_cause(exc)})") from None
    try:
        if f.frames == 0:
            raise AudioError(f"{name}: audio has no samples", "no_samples")
        check_sample_rate(f.samplerate, name)
        if f.channels > MAX_CHANNELS:
            raise AudioError(f"{name}: {f.channels} channels; at most {MAX_CHANNELS} are read", "channels")
    except AudioError:
        f.close()
        raise
    return f


def iter_windows(
    f: sf.SoundFile,
    window_s: float = 3.0,
    hop_s: float = 1.5,
    target_sr: int = 16_000,
    block_s: float = 30.0,
    name: str = "audio",
) -> Iterator[tuple[float, float, np.ndarray]]:
    """Yield ``(start_s, end_s, wave)`` for an open file; ``wave`` is float32 ``[window_s * target_sr]``.

    ``end_s`` is the end of real audio in the window (less than ``start_s + window_s`` for the
    padded last window). Memory: one block plus one window, whatever the file length.
    """
    if hop_s <= 0 or window_s <= 0:
        raise ValueError(f"window_s and hop_s must be positive, got {window_s}, {hop_s}")
    sr = f.samplerate
    win = max(1, int(round(window_s * sr)))
    hop = max(1, int(round(hop_s * sr)))
    out_len = int(round(window_s * target_sr))
    # a block is at most block_s of audio and at most MAX_BLOCK_BYTES decoded, but always one window
    block = max(win, min(int(block_s * sr), MAX_BLOCK_BYTES // (4 * max(1, f.channels))))

    buf = np.zeros(0, dtype=np.float32)  # mono samples from buf_start on
    buf_start = 0  # absolute sample index of buf[0]
    next_start = 0  # absolute sample index of the next window
    last_end = 0  # absolute end of the last emitted window
    total = 0

    def window(start: int, samples: np.ndarray) -> tuple[float, float, np.ndarray]:
        wave = fix_length(resample(samples, sr, target_sr), out_len)
        return start / sr, (start + len(samples)) / sr, wave.astype(np.float32, copy=False)

    f.seek(0)
    while True:
        data = f.read(block, dtype="float32", always_2d=True)
        if len(data) == 0:
            break
        check_samples(data, name)  # NaN / Inf / absurd values: an error row, never a label
        total += len(data)
        buf = np.concatenate([buf, data.mean(axis=1, dtype=np.float32)])
        while True:
            offset = next_start - buf_start
            if offset + win > len(buf):
                break
            yield window(next_start, buf[offset : offset + win])
            last_end = next_start + win
            next_start += hop
        # keep only what later windows need
        drop = min(max(0, next_start - buf_start), len(buf))
        buf, buf_start = buf[drop:], buf_start + drop
    # the tail that no full window reached: one zero-padded window
    if total > last_end and next_start < total:
        offset = next_start - buf_start
        yield window(next_start, buf[offset:])


def audio_info(f: sf.SoundFile) -> AudioInfo:
    return AudioInfo(f.frames / f.samplerate, f.samplerate, f.channels, f.frames)
