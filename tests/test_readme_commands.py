"""Every command the README shows parses: ``ser-ray ...`` against the CLI's parsers, ``python jobs/X.py``
and ``ray job submit ... -- python jobs/X.py`` against the job's own parser, and every ``configs/*.yaml``
they name exists. Nothing runs; the commands themselves are run by the tests of each stage."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _command(line: str) -> list[str] | None:
    if not re.match(r"\s*(\w+=\S+\s+)*(ser-ray |ray job submit |python jobs/)", line):
        return None
    words = shlex.split(line, comments=True)
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if words[0] == "ser-ray" and len(words) > 1 and words[1] != "COMMAND":
        return words
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        return words
    if words[0] == "python" and len(words) > 1 and words[1].startswith("jobs/"):
        return words
    return None


def readme_commands() -> list[str]:
    """Commands in fenced blocks, and inline ``ser-ray ...`` spans in the prose that are whole commands
    (two or more options, no ``[optional]`` or ``a|b`` parts); the command table's synopses are left out."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()  # continuation lines joined
    prose = "\n".join(line for line in text.splitlines() if not line.startswith("|"))  # not the synopsis table
    lines += [span for span in re.findall(r"`((?:ser-ray|python jobs/)[^`]+)`", prose)
              if span.count(" --") >= 2 and not re.search(r"[\[\]{}|…]|\.\.\.", span)]
    commands = [words for words in map(_command, lines) if words]
    return list({tuple(w): w for w in commands}.values())


def job_parser(script: str):
    spec = importlib.util.spec_from_file_location(f"readme_job_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines `parser`; the job itself runs only as __main__
    return module.parser


def parse(words: list[str]):
    from ser_ray import cli

    if words[0] == "ser-ray":
        argv = words[1:]
        return cli.build_parser(next((a for a in argv if a in cli.COMMANDS), None)).parse_args(argv)
    if words[0] == "ray":
        words = words[words.index("--") + 1:]
    assert words[0] == "python" and words[1].startswith("jobs/"), words
    return job_parser(words[1]).parse_args(words[2:])


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_kind():
    kinds = {words[0] if words[0] != "ray" else "ray job submit" for words in COMMANDS}
    assert {"ser-ray", "ray job submit"} <= kinds and len(COMMANDS) >= 20


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:70] for w in COMMANDS])
def test_readme_command_parses(words):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parse(words)
        except SystemExit as exc:
            pytest.fail(f"`{' '.join(words)}` does not parse (exit {exc.code}):\n{err.getvalue()}")
    config = getattr(args, "config", None)
    if config and config.startswith("configs/"):
        assert (REPO / config).exists(), f"{config} named in the README does not exist"
