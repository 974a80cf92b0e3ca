"""``ser-ray annotate``: label every file of an archive, offline with Ray Data or via a Serve endpoint."""

from __future__ import annotations

import logging

from ser_ray.annotate.core import NORMALISE_BY, AnnotateConfig
from ser_ray.annotate.vad import METHODS as VAD_METHODS
from ser_ray.annotate.writer import FORMATS
from ser_ray.ensemble.runtime import BACKENDS

log = logging.getLogger(__name__)


def add_arguments(parser, command_name: str = "annotate") -> None:
    parser.add_argument("--input", required=True, help="local directory or s3:// prefix to annotate")
    parser.add_argument("--output", required=True, help="local directory or s3:// prefix for files/ and segments/")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="bundle directory or s3:// prefix (offline, Ray Data)")
    source.add_argument("--endpoint", help="URL of a running `ser-ray serve` app")
    parser.add_argument("--window-s", type=float, default=AnnotateConfig.window_s)
    parser.add_argument("--hop-s", type=float, default=AnnotateConfig.hop_s)
    parser.add_argument("--vad", choices=VAD_METHODS, default=AnnotateConfig.vad)
    parser.add_argument("--vad-threshold-db", type=float, default=AnnotateConfig.vad_threshold_db)
    parser.add_argument("--normalise-by", choices=NORMALISE_BY, default=AnnotateConfig.normalise_by,
                        help="file: standardise features over each recording's own speech windows, for bundles "
                             "trained with normalise_by: speaker (offline only); auto: what the bundle was trained with")
    parser.add_argument("--max-duration-s", type=float, default=None,
                        help="files longer than this (from their header) get an error row instead of being read")
    parser.add_argument("--batch-files", type=int, default=16, help="files per committed output part")
    parser.add_argument("--num-actors", type=int, default=None, help="annotation actors (default: one per CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", choices=BACKENDS, default=AnnotateConfig.backend,
                        help="auto: each member as an ONNX Runtime session (CPU) or a TorchScript trace where its "
                             "logits stay the same, else as saved; the others force one form (eager where it fails)")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--max-attempts", type=int, default=2,
                        help="offline: a file whose worker dies this many times (crash, out of memory) gets an error row")
    parser.add_argument("--api-key-file", default=None,
                        help="with --endpoint: file holding the API key (default: $SER_RAY_API_KEY, "
                             "else ~/.config/ser-ray/api-key)")
    parser.add_argument("--page", default=None,
                        help="where to write the archive page (every file's emotion timeline, filters by label and "
                             "confidence, click a window to play it); default OUTPUT/archive.html for a local "
                             "output, none for s3:// unless given; `none` skips it. Rerunning on a finished "
                             "output only rewrites the page")
    parser.add_argument("--page-max-files", type=int, default=300, help="files shown on the archive page")


def run(args) -> int:
    config = AnnotateConfig(
        window_s=args.window_s, hop_s=args.hop_s, vad=args.vad, vad_threshold_db=args.vad_threshold_db,
        normalise_by=args.normalise_by, max_duration_s=args.max_duration_s, backend=args.backend,
    )
    if args.endpoint:
        from ser_ray.annotate.endpoint import annotate_via_endpoint

        # windowing and VAD are the server's settings on this path
        from ser_ray.auth import resolve_key

        summary = annotate_via_endpoint(
            args.input, args.output, args.endpoint, batch_files=args.batch_files, fmt=args.format,
            api_key=resolve_key(key_file=args.api_key_file),
        )
    else:
        from ser_ray.annotate.offline import annotate_archive
        from ser_ray.session import connect

        connect(args.address, dashboard=False)
        summary = annotate_archive(
            args.input, args.output, args.bundle, config,
            batch_files=args.batch_files, num_actors=args.num_actors, fmt=args.format, device=args.device,
            max_attempts=args.max_attempts,
        )
    log.info("summary: %s", {k: v for k, v in summary.items() if k != "batches"})
    page = write_page(args.output, args.page, args.format, args.page_max_files)
    if page:
        print(f"archive page: {page}")
    return 0


def write_page(output: str, page: str | None = None, fmt: str = "parquet", max_files: int = 300) -> str | None:
    """Render the archive page of the annotation output ``output``; returns its path (None when skipped)."""
    from ser_ray import storage
    from ser_ray.annotate.writer import ResultWriter
    from ser_ray.artefacts import ANNOTATION_PAGE
    from ser_ray.report.archive import render_archive

    if page == "none" or (page is None and storage.is_s3(output)):
        return None
    page = page or storage.join(output, ANNOTATION_PAGE)
    files, segments = ResultWriter(output, fmt).read_tables()
    if not len(files):
        return None
    return str(render_archive(files, segments, page, title=f"Archive: {output}", max_files=max_files))
