"""Bounded on a hostile archive: offline annotation and the Serve endpoint, against a benign baseline.

The hostile archive holds what a real archive should never hold, each file named for what it is: WAV
headers claiming odd or impossible sample rates, 17 and 8 channels, NaN / Inf / 1e30 float samples,
hour-long FLACs of constant DC (a few KB on disk, hours of windows), empty, random, text, truncated
and size-lying files, a FIFO, a link to /dev/zero, a dangling link and directory links that loop, plus
a few ordinary clips. The baseline is an archive of as many ordinary 3 s clips as the hostile one
lists. Both are annotated with ``annotate_archive`` in one local Ray (2 CPUs), measuring wall time and
the peak total memory (PSS where the kernel has it, else RSS) of this process and every process it
started (Ray's GCS, raylet, workers). Every listed file must end with exactly one ``files`` row.

Then a Serve endpoint with the same bundle takes hostile uploads one at a time, and the ingress
replica's RSS is measured before, at its peak during, and after each. The bundle is small (cnn width
8 + bigru_attn hidden 16 on 1 s log-mels, random weights): the point is memory and time, not labels.
Targets: each annotation run under 3 GB peak, each upload under 200 MB of ingress growth.

    python benchmarks/hostile.py [--hour-files 2] [--out DIR] [--keep] [--timeout 900]
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import ray  # before psutil: Ray ships its own psutil (ray/thirdparty_files), not a ser-ray dependency
import psutil  # noqa: E402
import soundfile as sf

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]
GB, MB = 1024**3, 1024**2
TARGET_RUN_GB, TARGET_UPLOAD_MB = 3.0, 200.0
MAX_UPLOAD_MB = 50


# -- inputs -----------------------------------------------------------------------------------------
def make_bundle(directory: Path) -> str:
    """The two neural members of tests/test_serve.py's bundle, random weights, 1 s windows."""
    import torch

    from ser_ray.ensemble.bundle import Bundle, Member, save_bundle
    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import build_model

    features = FeatureConfig(kind="logmel", window_s=1.0, n_mels=32, n_fft=512, hop_length=256)
    torch.manual_seed(0)
    members = [
        Member("cnn", build_model("cnn", len(LABELS), features, width=8), features, weight=0.6, temperature=1.5,
               name="cnn"),
        Member("bigru_attn", build_model("bigru_attn", len(LABELS), features, hidden=16, attn_dim=16), features,
               weight=0.4, temperature=1.0, name="bigru"),
    ]
    for m in members:
        m.model.eval()
    save_bundle(Bundle(labels=LABELS, members=members, sample_rate=16_000, window_s=1.0), str(directory))
    return str(directory)


def voice(seconds: float, sr: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A loud harmonic signal with noise, ``[samples, channels]``: the energy VAD takes it for speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(len(t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def wav_bytes(audio: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def write_dc(path: Path, minutes: float, sr: int = 8_000) -> None:
    """Constant DC as FLAC, a minute at a time: it compresses to almost nothing, yet every window is
    loud enough to count as speech."""
    minute = np.full(60 * sr, 0.25, dtype=np.float32)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(minutes)):
            f.write(minute)


def build_hostile(archive: Path, hour_files: int) -> list[str]:
    """Fill ``archive``; returns notes on what could not be made here."""
    archive.mkdir(parents=True)
    skipped = []
    # a header that claims a rate turns the same samples into a very different duration
    for sr in (2001, 7999, 16001, 22051, 44101):
        sf.write(archive / f"rate-{sr}hz.wav", voice(3.0, sr, seed=sr), sr, subtype="PCM_16")
    for sr in (1, 3_000_000):  # 48,000 samples: 13 hours at 1 Hz, 16 ms at 3 MHz
        try:
            (archive / f"rate-{sr}hz.wav").write_bytes(wav_bytes(voice(3.0, 16_000, seed=sr), sr))
        except Exception as exc:  # libsndfile refuses some rates outright
            skipped.append(f"rate-{sr}hz.wav: soundfile cannot write it ({type(exc).__name__})")
    sf.write(archive / "channels-17.wav", voice(1.0, 16_000, channels=17), 16_000, subtype="PCM_16")
    # 10 s x 8 channels x 192 kHz x 16 bit = 31 MB: under the upload limit, 64 MB per decoded block
    sf.write(archive / "channels-8-192khz.wav", voice(10.0, 192_000, channels=8), 192_000, subtype="PCM_16")
    for name, bad in (("nan", np.nan), ("inf", np.inf), ("1e30", 1e30)):
        audio = voice(3.0, 16_000, seed=7)
        audio[20_000:20_010] = bad
        sf.write(archive / f"float-{name}.wav", audio, 16_000, subtype="FLOAT")
    for k in range(hour_files):
        write_dc(archive / f"dc-1h-8khz-{k + 1}.flac", 60)
    write_dc(archive / "dc-10min-8khz.flac", 10)
    sf.write(archive / "silence-3s.wav", np.zeros(48_000, dtype=np.float32), 16_000, subtype="PCM_16")
    (archive / "empty.wav").write_bytes(b"")
    (archive / "empty.flac").write_bytes(b"")
    (archive / "header-only.wav").write_bytes(wav_bytes(np.zeros((0, 1), dtype=np.float32), 16_000))
    rng = np.random.default_rng(0)
    (archive / "random-bytes.wav").write_bytes(rng.bytes(65_536))
    (archive / "random-bytes.flac").write_bytes(rng.bytes(65_536))
    (archive / "notes.txt").write_text("not audio: a text file an archive picks up along the way\n" * 20)
    (archive / "text-named.wav").write_text("RIFF? no, just text with a .wav name\n" * 20)
    whole = wav_bytes(voice(3.0, 16_000, seed=3), 16_000)
    (archive / "truncated.wav").write_bytes(whole[: 44 + 20_000])  # header says 96,000 data bytes
    lying = bytearray(whole)
    lying[4:8] = struct.pack("<I", 0xFFFF_FFF0)  # RIFF size
    data = lying.find(b"data")
    lying[data + 4 : data + 8] = struct.pack("<I", 0xFFFF_FF00)  # data size: 4 GB claimed, 96 KB held
    (archive / "oversized-claim.wav").write_bytes(bytes(lying))
    try:
        os.mkfifo(archive / "fifo.wav")  # nothing ever writes to it: a blocking open never returns
    except (AttributeError, OSError) as exc:
        skipped.append(f"fifo.wav: {exc}")
    os.symlink("/dev/zero", archive / "zero.wav")  # endless zeros
    os.symlink(archive / "no-such-file.wav", archive / "dangling.wav")
    sub = archive / "sub"
    sub.mkdir()
    os.symlink("..", sub / "up")  # a walk that follows links never ends
    os.symlink(archive, sub / "root")
    sf.write(sub / "ok-16khz-in-sub.wav", voice(3.0, 16_000, seed=99), 16_000, subtype="PCM_16")
    for k in range(5):
        sr = 16_000 if k < 3 else 44_100
        sf.write(archive / f"ok-{sr // 1000}khz-{k + 1}.wav", voice(3.0, sr, seed=k), sr, subtype="PCM_16")
    return skipped


def build_benign(archive: Path, n: int) -> None:
    archive.mkdir(parents=True)
    for k in range(n):
        sr = 16_000 if k % 2 == 0 else 44_100
        sf.write(archive / f"ok-{sr // 1000}khz-{k + 1:03d}.wav", voice(3.0, sr, seed=k), sr, subtype="PCM_16")


def entries(root: Path) -> list[Path]:
    """Everything under ``root`` without following links: what the archive holds, listed or not."""
    found = []
    for item in os.scandir(root):
        found.append(Path(item.path))
        if item.is_dir(follow_symlinks=False):
            found += entries(Path(item.path))
    return found


# -- measuring --------------------------------------------------------------------------------------
def process_memory(process: psutil.Process) -> int:
    """PSS where the kernel reports it (shared pages, e.g. Ray's object store, counted once overall),
    else RSS; 0 for a process that has gone."""
    try:
        try:
            return process.memory_full_info().pss
        except (AttributeError, psutil.AccessDenied):
            return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0


class Sampler:
    """Peak of ``measure()`` sampled every ``interval`` seconds in a thread while the block runs."""

    def __init__(self, measure, interval: float):
        self.measure, self.interval = measure, interval
        self.peak = 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.measure()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def tree_memory() -> int:
    """Total memory of this process and all its descendants (Ray's processes are among them)."""
    me = psutil.Process()
    try:
        tree = [me, *me.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [me]
    return sum(process_memory(p) for p in tree)


def rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0


# -- annotation runs --------------------------------------------------------------------------------
def annotate_run(archive: Path, out: Path, bundle: str, timeout_s: float) -> dict:
    """``annotate_archive`` in a thread, so a hang is reported instead of hanging this script."""
    from ser_ray.annotate import AnnotateConfig
    from ser_ray.annotate.offline import annotate_archive

    shutil.rmtree(out, ignore_errors=True)
    result: dict = {}

    def target():
        try:
            result["summary"] = annotate_archive(str(archive), str(out), bundle, AnnotateConfig(window_s=1.0, hop_s=0.5),
                                                 batch_files=16, progress=False, max_attempts=2)
        except BaseException:
            result["crash"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True)
    with Sampler(tree_memory, 0.5) as memory:
        start = time.perf_counter()
        thread.start()
        thread.join(timeout_s)
        result["wall_s"] = time.perf_counter() - start
    result["ended"] = not thread.is_alive()
    result["peak_gb"] = memory.peak / GB
    return result


def check_rows(archive: Path, out: Path) -> dict:
    """Committed rows against the listing: every listed file once, nothing else."""
    from ser_ray.annotate.listing import list_archive
    from ser_ray.annotate.writer import ResultWriter

    listed = list_archive(str(archive), str(out))
    files, _ = ResultWriter(str(out)).read_tables()
    # read_tables keeps one row per uri; the parts themselves show whether a uri was written twice
    raw = [pd.read_parquet(p, columns=["uri"]) for p in sorted((out / "files").glob("part-*.parquet"))]
    raw_uris = pd.concat(raw)["uri"].tolist() if raw else []
    got = set(files["uri"]) if len(files) else set()
    counts = (files.fillna({"error_code": "-"}).groupby(["status", "error_code"]).size().to_dict()
              if len(files) else {})
    return {"listed": len(listed), "rows": len(files), "raw_rows": len(raw_uris),
            "missing": sorted(set(listed) - got), "unexpected": sorted(got - set(listed)),
            "repeated": sorted({u for u in raw_uris if raw_uris.count(u) > 1}),
            "counts": counts, "files": files}


def report_run(name: str, run: dict, rows: dict | None) -> None:
    print(f"\n== {name}: ended={run['ended']}  wall {run['wall_s']:.1f} s  peak {run['peak_gb']:.2f} GB")
    if run.get("crash"):
        print("annotate_archive raised:\n" + run["crash"])
    if rows is None:
        return
    print(f"listed {rows['listed']}, rows {rows['rows']} (raw {rows['raw_rows']}), missing {len(rows['missing'])}, "
          f"unexpected {len(rows['unexpected'])}, written twice {len(rows['repeated'])}")
    for label, uris in (("missing", rows["missing"]), ("unexpected", rows["unexpected"]),
                        ("written twice", rows["repeated"])):
        for uri in uris:
            print(f"  {label}: {uri}")
    for (status, code), n in sorted(rows["counts"].items()):
        print(f"  {status:6s} {code:16s} {n}")


# -- Serve ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_ingress() -> int | None:
    """The pid of our ingress replica: a descendant whose command line names ServeReplica and ingress."""
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "ServeReplica" in cmd and "ingress" in cmd:
            return p.pid
    return None


def serve_uploads(bundle: str, archive: Path, uploads: list[Path], warm_up: Path, rounds: int = 3) -> dict:
    import httpx
    from ray import serve

    from ser_ray.serve.app import ServeConfig, build_app
    from ser_ray.auth import digest

    key = secrets.token_urlsafe(24)
    # 0.5 + 0.5 + 0.25 CPUs: the three replicas fit on the 2 CPUs this Ray was given
    config = ServeConfig(bundle=bundle, allowed_roots=[str(archive)], api_key_sha256=digest(key),
                         max_upload_mb=MAX_UPLOAD_MB, num_cpus=0.5, ingress_num_cpus=0.25, request_timeout_s=300)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    serve.run(build_app(config), name="ser-ray-bench", route_prefix="/")
    pid = find_ingress()
    if pid is None:
        raise RuntimeError("no ingress replica process found (no descendant names ServeReplica and ingress)")
    url = f"http://127.0.0.1:{port}/predict"
    results = []
    with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}) as http:
        # one ordinary clip first: imports, thread pools and allocator arenas of a first request are
        # not what a hostile upload costs
        warm = http.post(url, files={"file": (warm_up.name, warm_up.read_bytes(), "application/octet-stream")})
        time.sleep(2.0)
        start_rss = rss(pid)
        round_start = {}
        with Sampler(tree_memory, 0.5) as tree:
            # more than once: the first round pays one-off costs (a codec's or resampler's first use); what
            # the second round leaves behind is what hostile uploads accumulate
            for round_ in range(1, rounds + 1):
                round_start[round_] = rss(pid)
                for path in uploads:
                    data = path.read_bytes()
                    before = rss(pid)
                    with Sampler(lambda: rss(pid), 0.05) as peak:
                        t0 = time.perf_counter()
                        try:
                            r = http.post(url, files={"file": (path.name, data, "application/octet-stream")})
                            status, detail = r.status_code, "" if r.status_code == 200 else r.text[:120]
                        except httpx.HTTPError as exc:
                            status, detail = None, f"{type(exc).__name__}: {exc}"
                        seconds = time.perf_counter() - t0
                    time.sleep(2.0)  # let the replica free what the request held
                    after = rss(pid)
                    alive = after > 0 and find_ingress() == pid
                    results.append({"round": round_, "upload": path.name, "MB": len(data) / MB, "status": status,
                                    "s": seconds, "before MB": before / MB, "peak MB": peak.peak / MB,
                                    "growth MB": (peak.peak - before) / MB, "after MB": after / MB,
                                    "same replica": alive, "detail": detail})
                    print(f"  round {round_} {path.name}: HTTP {status} in {seconds:.1f} s, ingress {before / MB:.0f} "
                          f"-> peak {peak.peak / MB:.0f} -> {after / MB:.0f} MB  {detail}", flush=True)
                    if not alive:
                        pid = find_ingress() or pid
    return {"warm_status": warm.status_code, "start_mb": start_rss / MB, "end_mb": rss(pid) / MB,
            "last_round_start_mb": round_start[rounds] / MB, "rounds": rounds,
            "tree_peak_gb": tree.peak / GB, "uploads": results}


# -- output -----------------------------------------------------------------------------------------
def text(value) -> str:
    return value if isinstance(value, str) else ""


def markdown(table: pd.DataFrame) -> None:
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for record in table.to_dict("records"):
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in record.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--hour-files", type=int, default=2, help="hour-long DC FLACs in the hostile archive")
    parser.add_argument("--keep", action="store_true", help="keep the archives, outputs and bundle")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as hung")
    args = parser.parse_args()

    from ser_ray.annotate.listing import list_archive

    temporary = args.out is None
    work = Path(args.out or tempfile.mkdtemp(prefix="ser-ray-hostile-")).absolute()
    made = [work / d for d in ("hostile", "benign", "hostile-out", "benign-out", "bundle")]
    for path in made:  # a rerun in the same --out starts from scratch, not from the last outputs
        shutil.rmtree(path, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    hostile, benign = work / "hostile", work / "benign"
    skipped = build_hostile(hostile, args.hour_files)
    listed = list_archive(str(hostile))
    build_benign(benign, len(listed))
    bundle = make_bundle(work / "bundle")
    held = entries(hostile)
    unlisted = sorted(str(p.relative_to(hostile)) for p in held
                      if str(p) not in listed and (p.is_symlink() or not p.is_dir()))
    print(f"hostile archive {hostile}: {len(held)} entries, {len(listed)} listed; not listed (not regular files, "
          f"links to directories): {', '.join(unlisted)}")
    for note in skipped:
        print(f"  skipped: {note}")
    print(f"benign archive: {len(listed)} ordinary 3 s clips (16 and 44.1 kHz)")

    from ser_ray.session import use_serve_proxy

    use_serve_proxy()  # Serve's HTTP proxy as `ser-ray serve` picks it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        idle_gb = tree_memory() / GB
        print(f"Ray idle (this process + descendants): {idle_gb:.2f} GB")
        runs, checks = {}, {}
        for name, archive in (("benign", benign), ("hostile", hostile)):
            out = work / f"{name}-out"
            runs[name] = annotate_run(archive, out, bundle, args.timeout)
            checks[name] = check_rows(archive, out) if runs[name]["ended"] else None
            report_run(name, runs[name], checks[name])
        if checks["hostile"] is not None:
            files = checks["hostile"]["files"]
            print("\nhostile archive, file by file:")
            for row in files.to_dict("records"):
                print(f"  {os.path.relpath(row['uri'], hostile):28s} {row['status']:6s} {text(row['error_code']) or '-':14s} "
                      f"{row['duration_s']:9.1f} s  {row['n_windows']:5d} windows  {text(row['error'])[:90]}")

        print("\n== Serve: one hostile upload at a time")
        uploads = [hostile / "rate-16001hz.wav", hostile / "dc-10min-8khz.flac"]
        eight = hostile / "channels-8-192khz.wav"
        if eight.stat().st_size < MAX_UPLOAD_MB * MB:
            uploads.append(eight)
        uploads.append(hostile / "float-nan.wav")
        served = None
        try:
            served = serve_uploads(bundle, hostile, uploads, hostile / "ok-16khz-1.wav")
        except Exception:
            print("Serve failed:\n" + traceback.format_exc())
        finally:
            from ray import serve

            serve.shutdown()
    finally:
        ray.shutdown()

    # -- summary ----------------------------------------------------------------------------------
    print("\n== Summary")
    table = pd.DataFrame([{
        "archive": name, "ended": run["ended"], "listed": checks[name]["listed"] if checks[name] else "-",
        "rows": checks[name]["rows"] if checks[name] else "-",
        "ok": checks[name]["files"]["status"].eq("ok").sum() if checks[name] else "-",
        "error": checks[name]["files"]["status"].eq("error").sum() if checks[name] else "-",
        "retry": checks[name]["files"]["status"].eq("retry").sum() if checks[name] else "-",
        "audio h": (run.get("summary") or {}).get("audio_s", 0.0) / 3600,
        "wall s": run["wall_s"], "peak GB": run["peak_gb"],
    } for name, run in runs.items()])
    markdown(table)
    b, h = runs["benign"], runs["hostile"]
    print(f"\nhostile / benign: wall time x{h['wall_s'] / b['wall_s']:.2f}, peak memory x{h['peak_gb'] / b['peak_gb']:.2f} "
          f"(Ray idle {idle_gb:.2f} GB)")
    if served:
        print()
        markdown(pd.DataFrame(served["uploads"]).drop(columns=["detail"]))
        print(f"\ningress RSS {served['start_mb']:.0f} MB before the hostile uploads, {served['end_mb']:.0f} MB after "
              f"{served['rounds']} rounds: {served['end_mb'] - served['start_mb']:+.0f} MB in all, "
              f"{served['end_mb'] - served['last_round_start_mb']:+.0f} MB over the last round; process tree peak "
              f"{served['tree_peak_gb']:.2f} GB (warm-up upload: HTTP {served['warm_status']})")

    # -- verdict ----------------------------------------------------------------------------------
    problems = []
    for name, run in runs.items():
        if not run["ended"]:
            problems.append(f"{name} run did not end within {args.timeout:g} s")
        if run.get("crash"):
            problems.append(f"{name} run raised")
        if run["peak_gb"] >= TARGET_RUN_GB:
            problems.append(f"{name} run peaked at {run['peak_gb']:.2f} GB")
        c = checks[name]
        if c and (c["missing"] or c["unexpected"] or c["repeated"] or c["rows"] != c["listed"]):
            problems.append(f"{name} rows do not match the listing one to one")
    if not served:
        problems.append("Serve measurements missing")
    else:
        for u in served["uploads"]:
            if u["growth MB"] >= TARGET_UPLOAD_MB:
                problems.append(f"upload {u['upload']} grew the ingress by {u['growth MB']:.0f} MB")
            if u["status"] is None or u["status"] >= 500 or not u["same replica"]:
                problems.append(f"upload {u['upload']}: HTTP {u['status']}, same replica {u['same replica']}")
    peaks = ", ".join(f"{r['peak_gb']:.2f}" for r in runs.values())
    growth = max((u["growth MB"] for u in served["uploads"]), default=float("nan")) if served else float("nan")
    verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    print(f"\nverdict: {verdict} (runs peaked at {peaks} GB, target < {TARGET_RUN_GB:g}; largest upload growth "
          f"{growth:.0f} MB, target < {TARGET_UPLOAD_MB:g})")

    if args.keep:
        print(f"kept {work}")
    elif temporary:
        shutil.rmtree(work, ignore_errors=True)
    else:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
