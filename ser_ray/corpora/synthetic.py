"""The embedded synthetic corpus: CREMA-D-shaped, speech-like audio that needs no download.

A source-filter synthesiser: a glottal pulse train (with jitter, shimmer, creak) plus aspiration
noise, through formant resonators per syllable, with syllable envelopes, consonant noise, plosive
bursts and pauses. Each actor has a voice (gender, F0 base and range, formant scale, loudness,
speaking rate) and a recording set-up (microphone high-pass, a colouring EQ, a noise floor), so
speakers differ as much as emotions do in loudness and pitch. Emotions follow the prosody the SER
literature describes (Banse & Scherer 1996; Juslin & Laukka 2003): anger is high, wide, loud, fast
and bright; sadness low, narrow, quiet, slow, dark and breathy; and so on (``EMOTIONS``).

Every clip draws from its own ``numpy`` Generator seeded by (seed, actor, sentence, emotion,
intensity), so the files are byte-identical across runs and independent of the number of workers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from scipy import signal
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
GENERATOR_VERSION = 2
FIRST_ACTOR = 1001
ARCHIVE_FIRST_ACTOR = 2001  # archive voices are not corpus voices

# CREMA-D sentence codes -> syllables. A syllable is onset consonants + one vowel; an upper-case
# vowel is stressed; "|" marks a phrase break where a pause may fall.
SENTENCES: dict[str, str] = {
    "IEO": "i s@ lE v@ n@ | klA",  # It's eleven o'clock
    "TIE": "dA tI s@ | gzA kli | wA tA p@ n@",  # That is exactly what happened
    "IOM": "A mo mA we | tu d@ mI ti",  # I'm on my way to the meeting
    "IWW": "A wU d@ | wA dI si | z@ bA",  # I wonder what this is about
    "TAI": "d@ E pe | nI zO mo fU",  # The airplane is almost full
    "MTI": "me bi | t@ mO ro | i wI ko",  # Maybe tomorrow it will be cold
    "IWL": "A wu lA k@ | nU @ lA m@ klA",  # I would like a new alarm clock
    "ITH": "A tI kA | hA v@ dA k@ z@ pO n@ m@",  # I think I have a doctor's appointment
    "DFA": "do f@ gE t@ | dZA k@",  # Don't forget a jacket
    "ITS": "A tI kA | v@ sI dI s@ fO",  # I think I've seen this before
    "TSI": "d@ sE f@ s@ | z@ slI",  # The surface is slick
    "WSI": "wi stA pI | n@ kA p@ lA | m@ n@",  # We'll stop in a couple of minutes
}
EMOTION_CODES = {"anger": "ANG", "disgust": "DIS", "fear": "FEA", "happiness": "HAP", "neutral": "NEU", "sadness": "SAD"}
# Intensity scales an emotion's deviation from neutral. CREMA-D: IEO in LO/MD/HI, the rest XX.
INTENSITY_SCALE = {"LO": 0.7, "MD": 0.9, "HI": 1.15, "XX": 1.0}

# Deviation from neutral speech per emotion, at intensity 1 (Banse & Scherer; Juslin & Laukka):
# f0: semitones; range: accent-size factor; loud: dB; rate: syllable-rate factor; tilt: change of
# the glottal low-pass pole (+ = steeper, darker); breath: aspiration ratio; jitter: period
# perturbation; shimmer: amplitude perturbation; creak: share of creaky syllables; pause: pause
# factor; tremor: F0 (semitones) and amplitude wobble at 5-7 Hz; glide: pitch movement inside a
# stressed vowel (x range, + rising); attack: syllable onset/offset ramp factor (< 1 crisper).
# Many of these cues (contour shape, tempo, jitter, noise, creak, attack) survive per-utterance
# normalisation, which removes loudness and recording colour (the speaker's cues) per clip.
EMOTIONS: dict[str, dict[str, float]] = {
    "neutral": dict(f0=0.0, range=0.5, loud=0.0, rate=1.0, tilt=0.0, breath=0.0, jitter=0.0, shimmer=0.0, creak=0.0, pause=1.0, tremor=0.0, glide=0.0, attack=1.0),
    "anger": dict(f0=5.0, range=1.6, loud=10.0, rate=1.3, tilt=-0.22, breath=-0.05, jitter=0.004, shimmer=0.04, creak=0.0, pause=0.5, tremor=0.0, glide=-0.8, attack=0.4),
    "happiness": dict(f0=7.0, range=2.8, loud=4.0, rate=1.08, tilt=-0.06, breath=0.15, jitter=0.0, shimmer=0.0, creak=0.0, pause=0.8, tremor=0.0, glide=0.9, attack=1.0),
    "sadness": dict(f0=-3.5, range=0.3, loud=-9.0, rate=0.65, tilt=0.07, breath=0.6, jitter=0.004, shimmer=0.03, creak=0.0, pause=2.0, tremor=0.0, glide=0.0, attack=2.5),
    "fear": dict(f0=8.0, range=0.9, loud=0.0, rate=1.35, tilt=0.0, breath=0.6, jitter=0.06, shimmer=0.12, creak=0.0, pause=1.4, tremor=2.2, glide=0.3, attack=0.8),
    "disgust": dict(f0=-2.0, range=1.2, loud=-4.0, rate=0.72, tilt=0.03, breath=0.0, jitter=0.02, shimmer=0.08, creak=0.9, pause=1.5, tremor=0.0, glide=-0.9, attack=1.5),
}
# Final contour per emotion (semitones x range): falls for anger and disgust, rises for happiness and fear.
FINAL_CONTOUR = {"neutral": -0.6, "anger": -2.0, "happiness": 1.2, "sadness": -0.4, "fear": 1.0, "disgust": -1.8}

# Vowel formants (Hz, adult male; Peterson & Barney) and bandwidths.
VOWELS = {
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (300, 2250, 3000),
    "o": (570, 840, 2410),
    "u": (320, 900, 2250),
    "@": (500, 1500, 2500),
}
SONORANT_FORMANTS = (300, 1200, 2500)
BANDWIDTHS = (70, 100, 160, 250)
F4 = 3400
FRICATIVES, PLOSIVES, SONORANTS = set("sfhzvZ"), set("ptkbdg"), set("mnlrwj")
VOICED = set("bdgzvZmnlrwj")


# -- voices -------------------------------------------------------------------------------------
def make_voice(seed: int, actor: int) -> dict:
    """An actor's voice and recording set-up, determined by ``(seed, actor)`` alone."""
    rng = np.random.default_rng([seed, actor, 7])
    gender = "female" if (actor + seed) % 2 else "male"
    female = gender == "female"
    return {
        "actor": int(actor),
        "gender": gender,
        "f0_hz": round(float((205.0 if female else 115.0) * 2 ** (rng.normal(0, 1.5) / 12)), 2),
        "range": round(float(rng.uniform(0.75, 1.3)), 3),
        "formant_scale": round(float(rng.normal(1.15 if female else 1.0, 0.04)), 3),
        "loud_db": round(float(rng.normal(0, 2.5)), 2),
        "rate": round(float(rng.uniform(0.85, 1.2)), 3),
        "tilt": round(float(rng.normal(0.0, 0.025)), 4),
        "breath": round(float(rng.uniform(0.0, 0.08) + (0.03 if female else 0.0)), 3),
        "jitter": round(float(rng.uniform(0.003, 0.01)), 4),
        "creak": round(float(rng.uniform(0.0, 0.04)), 3),
        "mic_highpass_hz": round(float(rng.uniform(50, 200)), 1),
        "eq_hz": round(float(np.exp(rng.uniform(np.log(300), np.log(5000)))), 1),
        "eq_db": round(float(rng.uniform(-5, 5)), 2),
        "noise_db": round(float(rng.uniform(-72, -48)), 2),
    }


# -- synthesis ----------------------------------------------------------------------------------
def _resonate(x: np.ndarray, freqs, bws, zi: list) -> np.ndarray:
    """Cascade of two-pole resonators with unity DC gain (Klatt), carrying filter state ``zi``."""
    for k, (f, bw) in enumerate(zip(freqs, bws)):
        f = min(f, 0.45 * SAMPLE_RATE)
        r = np.exp(-np.pi * bw / SAMPLE_RATE)
        a = [1.0, -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r]
        x, zi[k] = signal.lfilter([sum(a)], a, x, zi=zi[k])
    return x


def _layout(sentence: str, rate: float, pause: float, rng) -> list[dict]:
    """Segments of one utterance: consonants, vowels and pauses with durations in samples."""
    segments = []
    for token in SENTENCES[sentence].split():
        if token == "|":
            if rng.random() < min(0.9, 0.35 * pause):
                segments.append({"kind": "pause", "n": int(SAMPLE_RATE * rng.uniform(0.05, 0.15) * pause)})
            continue
        onset, vowel = token[:-1], token[-1]
        stressed = vowel.isupper()
        for c in onset:
            dur = {"f": 0.09, "p": 0.06, "s": 0.06}[
                "f" if c in FRICATIVES else "p" if c in PLOSIVES else "s"
            ] * rng.uniform(0.8, 1.2) / rate
            segments.append({"kind": c, "n": int(SAMPLE_RATE * dur)})
        dur = (0.17 if stressed else 0.11) * rng.uniform(0.8, 1.25) / rate
        segments.append({"kind": "vowel", "vowel": vowel.lower(), "stressed": stressed, "n": int(SAMPLE_RATE * dur)})
    return segments


def _utterance(voice: dict, sentence: str, emotion: str, intensity: str, rng) -> np.ndarray:
    """One dry utterance (no leading/trailing silence, no recording chain), level set."""
    scale = INTENSITY_SCALE[intensity] * rng.uniform(0.92, 1.08)
    neutral = EMOTIONS["neutral"]
    # Each parameter: neutral + scaled deviation, with its own (small) per-clip spread, so an
    # actor's clips of one emotion vary without drifting into the neighbouring emotion.
    p = {k: neutral[k] + scale * (v - neutral[k]) * rng.uniform(0.95, 1.05) for k, v in EMOTIONS[emotion].items()}
    f0_base = voice["f0_hz"] * 2 ** ((p["f0"] + rng.normal(0, 0.5)) / 12)
    range_st = 3.0 * voice["range"] * p["range"] * rng.uniform(0.9, 1.1)
    rate = voice["rate"] * p["rate"] * rng.uniform(0.95, 1.05)
    tilt = float(np.clip(0.90 + voice["tilt"] + p["tilt"] + rng.normal(0, 0.01), 0.6, 0.985))
    breath = max(0.0, voice["breath"] + p["breath"])
    jitter = voice["jitter"] + p["jitter"]
    shimmer = 0.03 + p["shimmer"]
    creak = min(0.9, voice["creak"] + p["creak"])

    segments = _layout(sentence, rate, p["pause"], rng)
    starts = np.cumsum([0] + [s["n"] for s in segments])
    n = int(starts[-1])
    t = np.arange(n) / SAMPLE_RATE

    # F0 contour (semitones above the base): declination, pitch accents on stressed vowels with
    # the emotion's glide inside them (rising for happiness, falling for anger and disgust), a
    # final contour, per-syllable scatter; interpolated between points at each vowel's edges.
    vowels = [(i, s) for i, s in enumerate(segments) if s["kind"] == "vowel"]
    points, targets = [], []
    for k, (i, s) in enumerate(vowels):
        centre = range_st * ((0.8 if s["stressed"] else 0.0) + rng.normal(0, 0.15)) - 2.0 * k / max(1, len(vowels) - 1)
        if k == len(vowels) - 1:
            centre += FINAL_CONTOUR[emotion] * range_st * 0.5
        glide = p["glide"] * range_st * (0.6 if s["stressed"] else 0.2)
        width = starts[i + 1] - starts[i]
        points += [starts[i] + 0.1 * width, starts[i] + 0.9 * width]
        targets += [centre - glide / 2, centre + glide / 2]
    semitones = np.interp(np.arange(n), points, targets)
    wobble = np.sin(2 * np.pi * rng.uniform(5, 7) * t + rng.uniform(0, 6.3))
    semitones += p["tremor"] * wobble
    f0 = f0_base * 2 ** (semitones / 12)

    # Glottal pulses: jitter perturbs each period, shimmer each pulse's amplitude.
    phase = np.cumsum(f0) / SAMPLE_RATE
    periods = int(phase[-1]) + 2
    f0 = f0 * (1 + jitter * rng.standard_normal(periods))[phase.astype(int)]
    phase = np.cumsum(f0) / SAMPLE_RATE
    pulse_at = np.flatnonzero(np.diff(np.floor(phase), prepend=0) > 0)
    amps = 1 + shimmer * rng.standard_normal(len(pulse_at))
    # Creak: in some syllables alternate strong/weak pulses (period doubling) and drop the pitch.
    creaky = np.zeros(n, dtype=bool)
    for i, s in vowels:
        if rng.random() < creak or (s is vowels[-1][1] and rng.random() < creak * 1.5):
            creaky[starts[i] : starts[i + 1]] = True
    in_creak = creaky[pulse_at]
    # Vocal fry: in creaky stretches every other pulse is also delayed (period doubling heard as
    # a subharmonic), beyond the weak alternate pulses below.
    odd = in_creak & (np.arange(len(pulse_at)) % 2 == 1)
    pulse_at = np.where(odd, np.minimum(n - 1, pulse_at + (0.25 * SAMPLE_RATE / f0[pulse_at]).astype(int)), pulse_at)
    amps[in_creak & (np.arange(len(pulse_at)) % 2 == 1)] *= 0.25
    keep = ~(in_creak & (rng.random(len(pulse_at)) < 0.3))  # irregular: some pulses missing
    source = np.zeros(n)
    source[pulse_at[keep]] = amps[keep]
    # Glottal flow spectrum (two-pole low-pass: the tilt) times lip radiation (a first difference).
    source = signal.lfilter([1.0], [1.0, -2 * tilt, tilt * tilt], source)
    source = np.diff(source, prepend=0.0)
    src_rms = np.sqrt(np.mean(source**2)) + 1e-12
    # Aspiration noise, modulated by the glottal cycle.
    cycle = 0.5 + 0.5 * np.cos(2 * np.pi * phase)
    source += breath * 2.5 * src_rms * rng.standard_normal(n) * cycle

    # Vocal tract, segment by segment, with one filter state carried through.
    fs = voice["formant_scale"] * (1.06 if emotion == "happiness" else 1.0)  # smiling raises formants
    f1_up = 1.0 + 0.1 * max(0.0, p["loud"]) / 7.0  # a wider mouth opening when shouting raises F1
    bws = [b * (1 + 2 * breath) for b in BANDWIDTHS]
    zi = [np.zeros(2) for _ in range(4)]
    out = np.zeros(n)
    envelope = np.zeros(n)
    for i, s in enumerate(segments):
        a, b, kind = starts[i], starts[i + 1], s["kind"]
        m = b - a
        if kind == "pause" or m <= 0:
            continue
        ramp = np.minimum(1.0, np.minimum(np.arange(m), np.arange(m)[::-1]) / max(1, 0.015 * p["attack"] * SAMPLE_RATE))
        if kind == "vowel":
            f1, f2, f3 = VOWELS[s["vowel"]]
            out[a:b] = _resonate(source[a:b], (f1 * fs * f1_up, f2 * fs, f3 * fs, F4 * fs), bws, zi)
            envelope[a:b] = ramp * (1.4 if s["stressed"] else 1.0)
        elif kind in SONORANTS or kind in VOICED:
            f = SONORANT_FORMANTS
            out[a:b] = _resonate(source[a:b], (f[0] * fs, f[1] * fs, f[2] * fs, F4 * fs), bws, zi)
            envelope[a:b] = ramp * (0.35 if kind in SONORANTS else 0.15)
        else:
            _resonate(np.zeros(m), (500, 1500, 2500, F4), bws, zi)  # let the tract ring down
    out *= envelope * (1 + 0.1 * p["tremor"] * wobble)  # tremor shakes the amplitude too
    speech_rms = np.sqrt(np.mean(out[envelope > 0] ** 2)) + 1e-12

    # Consonant noise: fricatives (s/z bright, f/v/h broad) and plosive bursts after a closure.
    for i, s in enumerate(segments):
        a, b, kind = starts[i], starts[i + 1], s["kind"]
        m = b - a
        if kind in FRICATIVES:
            noise = rng.standard_normal(m)
            if kind in "szZ":
                noise = signal.lfilter(*_HIGHPASS_S, noise)
            level = 0.5 if kind in "szZ" else 0.2
            out[a:b] += level * speech_rms * noise * np.hanning(m)
        elif kind in PLOSIVES:
            burst = min(m, int(0.012 * SAMPLE_RATE))
            noise = rng.standard_normal(burst) * np.exp(-np.arange(burst) / (0.003 * SAMPLE_RATE))
            out[b - burst : b] += 0.9 * speech_rms * signal.lfilter(*_HIGHPASS_BURST, noise)

    level_db = -26.0 + voice["loud_db"] + p["loud"] + rng.normal(0, 1.0)
    return out * (10 ** (level_db / 20) / speech_rms)


_HIGHPASS_S = signal.butter(2, 3800, "highpass", fs=SAMPLE_RATE)
_HIGHPASS_BURST = signal.butter(1, 1500, "highpass", fs=SAMPLE_RATE)


def _record(audio: np.ndarray, voice: dict, rng) -> np.ndarray:
    """The actor's recording set-up: microphone high-pass, a colouring EQ, a noise floor."""
    b, a = signal.butter(2, voice["mic_highpass_hz"], "highpass", fs=SAMPLE_RATE)
    audio = signal.lfilter(b, a, audio)
    # Peaking EQ (RBJ cookbook), Q = 1.
    gain, w0 = 10 ** (voice["eq_db"] / 40), 2 * np.pi * voice["eq_hz"] / SAMPLE_RATE
    alpha = np.sin(w0) / 2
    b = [1 + alpha * gain, -2 * np.cos(w0), 1 - alpha * gain]
    a = [1 + alpha / gain, -2 * np.cos(w0), 1 - alpha / gain]
    audio = signal.lfilter(b, a, audio)
    noise = signal.lfilter([1.0], [1.0, -0.7], rng.standard_normal(len(audio)))  # a little pink
    noise *= 10 ** (voice["noise_db"] / 20) / (np.std(noise) + 1e-12)
    return np.clip(audio + noise, -0.999, 0.999)


def synth_clip(voice: dict, sentence: str, emotion: str, intensity: str, seed: int) -> np.ndarray:
    """One CREMA-D-like clip (float32, 16 kHz) with leading and trailing silence."""
    rng = np.random.default_rng(
        [seed, voice["actor"], list(SENTENCES).index(sentence), list(EMOTIONS).index(emotion), list(INTENSITY_SCALE).index(intensity)]
    )
    speech = _utterance(voice, sentence, emotion, intensity, rng)
    lead, trail = (int(SAMPLE_RATE * rng.uniform(lo, hi)) for lo, hi in ((0.15, 0.5), (0.2, 0.6)))
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    return _record(audio, voice, rng).astype(np.float32)


def clip_name(actor: int, sentence: str, emotion: str, intensity: str) -> str:
    return f"{actor}_{sentence}_{EMOTION_CODES[emotion]}_{intensity}.wav"


def clip_plan(sentences=None, emotions=None) -> list[tuple[str, str, str]]:
    """(sentence, emotion, intensity) per actor as in CREMA-D: IEO in LO/MD/HI (neutral XX), rest XX."""
    plan = []
    for sentence in sentences or SENTENCES:
        for emotion in emotions or EMOTIONS:
            levels = ("LO", "MD", "HI") if sentence == "IEO" and emotion != "neutral" else ("XX",)
            plan += [(sentence, emotion, level) for level in levels]
    return plan


def _write_clip(task) -> str:
    out, voice, sentence, emotion, intensity, seed = task
    name = clip_name(voice["actor"], sentence, emotion, intensity)
    sf.write(os.path.join(out, name), synth_clip(voice, sentence, emotion, intensity, seed), SAMPLE_RATE, subtype="PCM_16")
    return name


def _run(fn, tasks: list, workers: int, progress: bool, desc: str) -> list:
    """``fn`` over ``tasks`` in ``workers`` processes (in this process when 1), with a progress bar."""
    bar = tqdm(total=len(tasks), desc=desc, unit="file", disable=not progress)
    results = []
    if workers <= 1:
        for task in tasks:
            results.append(fn(task))
            bar.update()
    else:
        # spawn: a clean child even when the caller holds threads (Ray, torch) that fork would copy.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(fn, tasks, chunksize=max(1, len(tasks) // (workers * 16))):
                results.append(result)
                bar.update()
    bar.close()
    return results


def generate(
    out: str | Path,
    actors: int = 24,
    seed: int = 0,
    *,
    sentences: list[str] | None = None,
    emotions: list[str] | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Write the synthetic corpus to ``out`` (a local directory) and return its ``synthetic.json``.

    ``sentences`` and ``emotions`` choose subsets (small corpora for tests). Clips are named as in
    CREMA-D (``1001_IEO_ANG_HI.wav``), so ``ser-ray manifest --corpus synthetic`` (or ``cremad``) reads them.
    """
    unknown = sorted(set(sentences or ()) - set(SENTENCES)) + sorted(set(emotions or ()) - set(EMOTIONS))
    if unknown:
        raise ValueError(f"unknown sentences/emotions {unknown}; choose from {list(SENTENCES)} and {list(EMOTIONS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    voices = [make_voice(seed, FIRST_ACTOR + k) for k in range(actors)]
    plan = clip_plan(sentences, emotions)
    tasks = [(str(out), v, s, e, i, seed) for v in voices for s, e, i in plan]
    log.info("synthesising %d clips (%d actors x %d) into %s with %d worker(s)", len(tasks), actors, len(plan), out, workers)
    _run(_write_clip, tasks, workers, progress, "synth")
    meta = {
        "generator": "ser_ray.corpora.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "n_files": len(tasks),
        "sentences": list(sentences or SENTENCES),
        "emotions": list(emotions or EMOTIONS),
        "actors": voices,
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


# -- archive: long recordings with emotions changing over time ---------------------------------
def _archive_file(task) -> list[dict]:
    out, index, seed, min_s, max_s = task
    rng = np.random.default_rng([seed, 9000, index])
    voice = make_voice(seed, ARCHIVE_FIRST_ACTOR + index)
    name = f"archive_{index + 1:02d}.wav"
    length = rng.uniform(min_s, max_s)
    pieces, rows, t = [], [], 0.0

    def add(audio: np.ndarray, label: str):
        nonlocal t
        pieces.append(audio)
        rows.append({"file": name, "start_s": round(t, 3), "end_s": round(t + len(audio) / SAMPLE_RATE, 3), "emotion": label})
        t += len(audio) / SAMPLE_RATE

    emotion = None
    add(np.zeros(int(SAMPLE_RATE * rng.uniform(0.5, 2.0))), "silence")
    while t < length - 4.0:
        emotion = rng.choice([e for e in EMOTIONS if e != emotion])
        segment, target = [], rng.uniform(4.0, 12.0)
        while sum(len(x) for x in segment) / SAMPLE_RATE < target:
            if segment:  # a short breath between sentences of the same emotion
                segment.append(np.zeros(int(SAMPLE_RATE * rng.uniform(0.15, 0.4))))
            sentence = rng.choice(list(SENTENCES))
            intensity = rng.choice(["LO", "MD", "HI", "XX"]) if emotion != "neutral" else "XX"
            segment.append(_utterance(voice, sentence, emotion, intensity, rng))
        add(np.concatenate(segment), str(emotion))
        add(np.zeros(int(SAMPLE_RATE * rng.uniform(0.8, 3.0))), "silence")
    audio = _record(np.concatenate(pieces), voice, rng).astype(np.float32)
    sf.write(os.path.join(out, name), audio, SAMPLE_RATE, subtype="PCM_16")
    return rows


def generate_archive(
    out: str | Path,
    files: int = 6,
    seed: int = 0,
    *,
    min_s: float = 30.0,
    max_s: float = 180.0,
    workers: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Write ``files`` long recordings (one synthetic speaker each, emotion changing over time) and
    ``timeline.csv`` (file, start_s, end_s, emotion; pauses between segments are ``silence``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), k, seed, min_s, max_s) for k in range(files)]
    rows = [row for file_rows in _run(_archive_file, tasks, workers, progress, "archive") for row in file_rows]
    timeline = pd.DataFrame(rows, columns=["file", "start_s", "end_s", "emotion"])
    timeline.to_csv(out / "timeline.csv", index=False)
    log.info("wrote %d archive files (%.0f s of audio) and timeline.csv to %s", files, timeline["end_s"].groupby(timeline["file"]).max().sum(), out)
    return timeline
