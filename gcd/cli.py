"""gcd's command line: main(argv) -> exit code. What each command does is in commands.py.

This module loads only the standard library, so that signals are held (signals.py) from
the process's first moments; the rest of gcd is imported once they are."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gcd import __version__, logs
from gcd.signals import Held


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcd",
        description="Garbage collector for the local image cache of a Docker engine.",
    )
    parser.add_argument("--version", action="version", version=f"gcd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", metavar="PATH", help="default: $GCD_CONFIG, else /etc/gcd/config.yaml"
        )

    def with_output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("text", "json"), default="text")

    p = sub.add_parser("run", help="one cycle: snapshot, plan, remove, report")
    with_config(p)
    p.add_argument("--dry-run", action="store_true", help="plan and report only; remove nothing")
    with_output(p)
    p = sub.add_parser("plan", help="same as run --dry-run")
    with_config(p)
    with_output(p)
    p = sub.add_parser("explain", help="why each image is kept or removed")
    with_config(p)
    p.add_argument("refs", nargs="+", metavar="REF_OR_ID")
    p = sub.add_parser("check-config", help='validate a configuration; print errors or "ok"')
    p.add_argument("path", nargs="?", metavar="PATH")
    p = sub.add_parser("daemon", help="run cycles on the configured schedule (systemd Type=notify)")
    with_config(p)
    sub.add_parser("schema", help="print the configuration's JSON Schema (for editors and CI)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The first line that matters: until a command takes them over, signals wait (signals.py).
    held = Held()
    try:
        return _main(argv, held)
    except KeyboardInterrupt:
        print("gcd: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None, held: Held) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.verbose)
    # Imported here, with signals held: docker-py, PyYAML and RE2 take about 0.15 s to load.
    from gcd import commands
    from gcd.errors import ConfigError, GcdError

    try:
        if args.command == "daemon":
            return commands.daemon(args.config, held)
        if args.command == "run" and not args.dry_run:
            return commands.run(commands.load(args.config), args.output, held)
        held.release()  # read-only commands: signals as Python handles them
        if args.command == "check-config":
            return commands.check_config(args.path)
        if args.command == "schema":
            return commands.schema()
        cfg = commands.load(args.config)
        if args.command == "explain":
            return commands.explain(cfg, args.refs)
        return commands.plan(cfg, args.output)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return e.exit_code
    except GcdError as e:
        print(f"gcd: {e}", file=sys.stderr)
        return e.exit_code
