"""``ser-ray report``: render the HTML report of any result directory."""

from __future__ import annotations


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--from", dest="source", required=True, help="result directory (e.g. a demo's --out)")
    parser.add_argument("--out", help="HTML file to write (default: DIR/report.html)")


def run(args) -> int:
    from ser_ray.report.html import render_report

    path = render_report(args.source, args.out)
    print(f"report: {path}")
    return 0
