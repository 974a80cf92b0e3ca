"""RAVDESS: ``Actor_AA/MM-VV-EE-II-SS-RR-AA.wav`` (modality, vocal channel, emotion, intensity,
statement, repetition, actor). Only audio-only speech (modality 03, channel 01) becomes rows;
video files and songs are reported as skipped. Odd actors are male, even actors female.
"""

from __future__ import annotations

from ser_ray.corpora.base import SkipFile, stem

CORPUS = "ravdess"
EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happiness",
    "04": "sadness",
    "05": "anger",
    "06": "fear",
    "07": "disgust",
    "08": "surprise",
}
INTENSITIES = {"01": "normal", "02": "strong"}
METADATA_FILES: tuple[str, ...] = ()


def parse(uri: str, corpus: str = CORPUS) -> dict:
    """Manifest fields from a RAVDESS file name; raises ``SkipFile`` when it does not parse."""
    parts = stem(uri).split("-")
    if (
        len(parts) != 7
        or not all(len(p) == 2 and p.isdigit() for p in parts)
        or parts[2] not in EMOTIONS
        or parts[3] not in INTENSITIES
    ):
        raise SkipFile("name does not parse", f"{uri}: expected MM-VV-EE-II-SS-RR-AA.wav")
    modality, channel, emotion, intensity, statement, _repetition, actor = parts
    if modality != "03":
        raise SkipFile("not audio-only", f"{uri}: modality {modality} (only 03, audio-only, is used)")
    if channel != "01":
        raise SkipFile("song, not speech", f"{uri}: vocal channel {channel} is song")
    return {
        "speaker": f"{corpus}:{actor}",
        "gender": "male" if int(actor) % 2 else "female",
        "sentence": statement,
        "emotion": EMOTIONS[emotion],
        "intensity": INTENSITIES[intensity],
    }


def genders(root: str, corpus: str = CORPUS) -> dict[str, str]:
    return {}  # in the file name
