"""The ``clearskies`` command: a thin client of the daemon's control socket."""

import argparse
import sys

from clearskies import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearskies",
        description="Keep directories in sync with your other machines.",
    )
    parser.add_argument("--version", action="version", version="clearskies " + __version__)
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
