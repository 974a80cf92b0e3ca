"""CREMA-D: ``ActorID_Sentence_Emotion_Intensity.wav``, e.g. ``1001_IEO_ANG_HI.wav``.

Actor genders live in ``VideoDemographics.csv`` (columns ActorID, Sex) of the CREMA-D repository;
when it is not at the corpus root, the synthetic generator's ``synthetic.json`` is used, else
``unknown``.
"""

from __future__ import annotations

import io
import json
import logging

import pandas as pd

from ser_ray import storage
from ser_ray.corpora.base import SkipFile, stem

log = logging.getLogger(__name__)

CORPUS = "cremad"
EMOTIONS = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happiness", "NEU": "neutral", "SAD": "sadness"}
INTENSITIES = ("LO", "MD", "HI", "XX")
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
# Clips known to be unusable in the published corpus.
KNOWN_BAD = {"1076_MTI_SAD_XX": "known empty clip in CREMA-D (0 s of audio)"}
METADATA_FILES = ("VideoDemographics.csv", "synthetic.json")


def parse(uri: str, corpus: str = CORPUS) -> dict:
    """Manifest fields from a CREMA-D file name; raises ``SkipFile`` when it does not parse."""
    name = stem(uri)
    if name in KNOWN_BAD:
        raise SkipFile("known bad clip", f"{uri}: {KNOWN_BAD[name]}")
    parts = name.split("_")
    if (
        len(parts) != 4
        or not parts[0].isdigit()
        or parts[1] not in SENTENCES
        or parts[2] not in EMOTIONS
        or parts[3] not in INTENSITIES
    ):
        raise SkipFile("name does not parse", f"{uri}: expected ActorID_Sentence_Emotion_Intensity.wav")
    actor, sentence, emotion, intensity = parts
    return {"speaker": f"{corpus}:{actor}", "sentence": sentence, "emotion": EMOTIONS[emotion], "intensity": intensity}


def genders(root: str, corpus: str = CORPUS) -> dict[str, str]:
    """Speaker -> gender from VideoDemographics.csv or synthetic.json at ``root`` (empty if neither)."""
    demographics = storage.join(root, "VideoDemographics.csv")
    if storage.exists(demographics):
        table = pd.read_csv(io.BytesIO(storage.read_bytes(demographics)))
        return {f"{corpus}:{row.ActorID}": str(row.Sex).strip().lower() for row in table.itertuples()}
    synthetic = storage.join(root, "synthetic.json")
    if storage.exists(synthetic):
        meta = json.loads(storage.read_bytes(synthetic))
        return {f"{corpus}:{a['actor']}": a["gender"] for a in meta["actors"]}
    log.info("%s: no VideoDemographics.csv or synthetic.json; speaker gender is 'unknown'", root)
    return {}
