"""EmoDB (Berlin): ``03a01Fa.wav`` = speaker 03, sentence a01, emotion F, version a."""

from __future__ import annotations

from ser_ray.corpora.base import SkipFile, stem

CORPUS = "emodb"
EMOTIONS = {
    "W": "anger",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "happiness",
    "T": "sadness",
    "N": "neutral",
}
MALE = {"03", "10", "11", "12", "15"}
FEMALE = {"08", "09", "13", "14", "16"}
METADATA_FILES: tuple[str, ...] = ()


def parse(uri: str, corpus: str = CORPUS) -> dict:
    """Manifest fields from an EmoDB file name; raises ``SkipFile`` when it does not parse."""
    name = stem(uri)
    if len(name) != 7 or not name[:2].isdigit() or name[5] not in EMOTIONS:
        raise SkipFile("name does not parse", f"{uri}: expected e.g. 03a01Fa.wav")
    speaker = name[:2]
    gender = "male" if speaker in MALE else "female" if speaker in FEMALE else "unknown"
    return {
        "speaker": f"{corpus}:{speaker}",
        "gender": gender,
        "sentence": name[2:5],
        "emotion": EMOTIONS[name[5]],
        "intensity": name[6],
    }


def genders(root: str, corpus: str = CORPUS) -> dict[str, str]:
    return {}  # in the file name
