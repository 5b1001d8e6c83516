"""Shared by the command-line tests: run ``python -m metabp`` in-process."""

from __future__ import annotations

from metabp.cli import main


def run_cli(args, capsys):
    """Exit status, stdout and stderr of the command line (argparse's own exits included)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
