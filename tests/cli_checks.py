"""Shared checks for CLI tests: a refused command prints one error and leaves nothing."""

from __future__ import annotations

from typer.testing import CliRunner

from edgeia3.cli import app

runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def merge_cli(base, adapter, out):
    return invoke("merge", "--base", base, "--adapter", adapter, "--out", out)


def assert_refused(result, out, *needles):
    """Exit code 2, an 'error:' line containing every needle, and no output (not even a temp)."""
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.lower().split())  # rich wraps long lines
    assert "error:" in text
    for n in needles:
        assert n.lower() in text, result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
