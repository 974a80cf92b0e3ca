"""Incremental, resumable annotation tables (Parquet or CSV, local or ``s3://``).

Layout under the output::

    segments/part-<batch>.parquet   one row per speech window
    files/part-<batch>.parquet      one row per input file; written last, so it commits the batch

A batch counts only once its ``files`` part exists (local writes go through a temp file, an fsync, a
rename and an fsync of the directory; an S3 PUT is atomic). Writing needs the output's lock
(``with ResultWriter(...) as writer``, see ``lock.py``): a second run on the same output refuses
instead of overwriting or deleting the first one's parts. Under the lock, ``segments`` parts without
their ``files`` part, left by a killed run, are deleted.

A uri whose committed row has ``status`` ``ok`` or ``error`` is done and never written again. A
``retry`` row (the storage failed, not the file) is not done: the next run annotates the file again
and its new row supersedes the old one when the tables are read.
"""

from __future__ import annotations

import io
import logging
import os
import re

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ser_ray import storage
from ser_ray.annotate.lock import OutputLock
from ser_ray.artefacts import ANNOTATION_FILES as FILES
from ser_ray.artefacts import ANNOTATION_SEGMENTS as SEGMENTS

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv")
_PART = re.compile(r"^part-(\d+)\.(parquet|csv)$")
_STRING_COLUMNS = ("uri", "status", "error", "label", "normalise_by", "error_code")
FINAL = ("ok", "error")  # statuses that settle a uri; "retry" does not
_INT_COLUMNS = ("n_segments", "n_windows", "batch")


class ResultWriter:
    """Append committed batches of ``files``/``segments`` rows under ``output_uri``."""

    def __init__(self, output_uri: str, fmt: str = "parquet"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose parquet or csv")
        self.output_uri = str(output_uri).rstrip("/") if storage.is_s3(output_uri) else str(output_uri)
        self.fmt = fmt
        self.fs, self.root = storage.filesystem_and_path(self.output_uri)
        self._lock: OutputLock | None = None
        self._done = self._read_done()

    def __enter__(self) -> "ResultWriter":
        """Take the output's lock (``OutputBusy`` if another run holds it), then tidy and read it."""
        self._lock = OutputLock(self.output_uri).acquire()
        try:
            for table in (FILES, SEGMENTS):
                self.fs.create_dir(f"{self.root}/{table}", recursive=True)
            self._clean_orphans()
            self._done = self._read_done()
            self._next = max(self._batches(FILES) | self._batches(SEGMENTS), default=-1) + 1
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- layout ---------------------------------------------------------------------------------
    def _part(self, table: str, batch: int) -> str:
        return f"{self.root}/{table}/part-{batch:06d}.{self.fmt}"

    def _listing(self, table: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    def _batches(self, table: str) -> set[int]:
        out = set()
        for info in self._listing(table):
            m = _PART.match(info.base_name)
            if m and m.group(2) == self.fmt:
                out.add(int(m.group(1)))
        return out

    def _clean_orphans(self) -> None:
        committed = self._batches(FILES)
        for table in (FILES, SEGMENTS):
            for info in self._listing(table):
                m = _PART.match(info.base_name)
                orphan = table == SEGMENTS and m and int(m.group(1)) not in committed
                if orphan or info.base_name.endswith(".tmp"):
                    log.info("removing %s left by an interrupted run", info.path)
                    self.fs.delete_file(info.path)

    # -- reading --------------------------------------------------------------------------------
    def _read_part(self, path: str, columns: list[str] | None = None) -> pd.DataFrame:
        if self.fmt == "parquet":
            return pq.read_table(path, filesystem=self.fs, columns=columns).to_pandas()
        with self.fs.open_input_stream(path) as f:
            return pd.read_csv(io.BytesIO(f.read()), usecols=columns, keep_default_na=True)

    def _read_table(self, table: str, columns: list[str] | None = None) -> pd.DataFrame:
        parts = [self._part(table, b) for b in sorted(self._batches(table))]
        frames = [self._read_part(p, columns) for p in parts]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def _read_done(self) -> set[str]:
        files = self._read_table(FILES, ["uri", "status"])
        if not len(files):
            return set()
        return set(files.loc[files["status"].isin(FINAL), "uri"].tolist())

    def done_uris(self) -> set[str]:
        """URIs that already have a committed ``files`` row."""
        return set(self._done)

    def read_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(files_df, segments_df)``: one row per uri (its latest committed row; a ``retry`` row is
        superseded by a later one) and that row's segments, sorted by uri (and start)."""
        committed = self._batches(FILES)
        files = self._read_table(FILES)
        segs = [self._read_part(self._part(SEGMENTS, b)) for b in sorted(self._batches(SEGMENTS) & committed)]
        segs = [s for s in segs if len(s)]
        segments = pd.concat(segs, ignore_index=True) if segs else pd.DataFrame(columns=["uri", "start_s", "end_s"])
        if len(files):
            files = files.sort_values("batch", kind="stable").drop_duplicates("uri", keep="last")
            files = files.sort_values("uri", kind="stable").reset_index(drop=True)
        if len(segments):
            if "batch" in segments and len(files):  # only the segments of each uri's chosen row
                chosen = files[["uri", "batch"]]
                segments = segments.merge(chosen, on=["uri", "batch"], how="inner")
            segments = segments.sort_values(["uri", "start_s"], kind="stable").reset_index(drop=True)
        return files, segments

    # -- writing --------------------------------------------------------------------------------
    def commit(self, file_rows: list[dict], segment_rows: list[dict]) -> int | None:
        """Write one batch (segments first, then the files part that commits it); returns its id.

        Rows for uris already done (or repeated within the batch) are dropped, and so are repeated
        segments of a uri; ``None`` when nothing is left to write.
        """
        if self._lock is None:
            raise RuntimeError("ResultWriter.commit needs the output's lock: use `with ResultWriter(...) as writer`")
        self._lock.check()
        fresh, seen = [], set()
        for row in file_rows:
            if row["uri"] in self._done or row["uri"] in seen:
                log.warning("%s is already annotated; not writing it again", row["uri"])
                continue
            seen.add(row["uri"])
            fresh.append(row)
        if not fresh:
            return None
        batch = self._next
        self._next += 1
        segs, seen_segments = [], set()
        for seg in segment_rows:
            key = (seg["uri"], seg.get("start_s"), seg.get("end_s"))
            if seg["uri"] in seen and key not in seen_segments:
                seen_segments.add(key)
                segs.append(seg)
        if segs:
            self._write(self._part(SEGMENTS, batch), _frame(segs, batch))
        self._write(self._part(FILES, batch), _frame(fresh, batch))
        self._done |= {row["uri"] for row in fresh if row.get("status") in FINAL}
        return batch

    def _write(self, path: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        if self.fmt == "parquet":
            pq.write_table(_arrow(df), buf)
        else:
            df.to_csv(buf, index=False)
        data = buf.getvalue()
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the whole part or none
            directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)  # the rename itself survives a power cut
            finally:
                os.close(directory)
        else:
            with self.fs.open_output_stream(path) as f:  # one PUT: atomic on S3
                f.write(data)


def _frame(rows: list[dict], batch: int) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["batch"] = batch
    return df


def _arrow(df: pd.DataFrame) -> pa.Table:
    """Stable column types, so parts with all-null columns still share one schema."""
    fields = []
    for col in df.columns:
        if col in _STRING_COLUMNS:
            fields.append(pa.field(col, pa.string()))
        elif col in _INT_COLUMNS:
            fields.append(pa.field(col, pa.int64()))
        else:
            fields.append(pa.field(col, pa.float64()))
    return pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)
