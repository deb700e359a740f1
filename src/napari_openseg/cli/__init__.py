"""``openseg``: the command line over ``napari_openseg.core``.

Each subcommand lives in its own module with a ``register(subparsers)`` function that adds its parser
and sets ``handler``; the list below is the only place that knows them all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from napari_openseg import __version__
from napari_openseg.errors import OpenSegError

SUBCOMMAND_MODULES = (
    "info",
    "support",
    "segment",
    "batch",
    "demo",
    "train",
    "evaluate",
    "novelty",
    "propagate",
)

#: How every command's help describes a slice axis (the project's arrays are NIfTI's axes reversed).
AXIS_HELP = "slice axis of 3D volumes, in array order: 0 is the NIfTI file's third axis"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, unless the help already speaks of a default or
    there is none to show (``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; subcommands get it too (argparse
    makes subparsers of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="openseg", description="Segmentation by example (UniverSeg-style in-context segmentation)."
    )
    parser.add_argument("--version", action="version", version=f"napari-openseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``), raised where the program is, so that it stops as Ctrl-C stops it:
    temporary files are removed and nothing is left half-written."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises :class:`Terminated` (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        with sigterm_as_interrupt():
            return int(args.handler(args) or 0)
    except OpenSegError as err:
        print(f"openseg: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the checks could not foresee (a disk that filled up, a folder removed)
        where = f" ({err.filename})" if err.filename else ""
        print(f"openseg: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        # outputs are written whole or not at all, but those finished before Ctrl-C stay
        print(
            "openseg: cancelled; no file was left half-written (outputs finished before stay)",
            file=sys.stderr,
        )
        return 143 if isinstance(err, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
