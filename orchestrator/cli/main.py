"""The ``meshpilot`` command line. Each subcommand lives in its own ``cmd_*`` module that
exposes ``add_parser(subparsers)``; user mistakes (:class:`ConfigError`, and the OS refusing a
path the user gave: too long, not writable, disk full) exit with status 2 and a one-line
message, never a traceback. Messages echo at most a few hundred characters of a value
(:func:`~meshpilot.orchestrator.errors.shown`) and are printed as plain text (no Rich markup)."""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import os
import sys

from meshpilot.orchestrator.errors import ConfigError, shown

_COMMAND_MODULES = (
    "meshpilot.orchestrator.cli.cmd_presets",
    "meshpilot.orchestrator.cli.cmd_validate",
    "meshpilot.orchestrator.cli.cmd_data",
    "meshpilot.orchestrator.cli.cmd_probe",
    "meshpilot.orchestrator.cli.cmd_calibrate",
    "meshpilot.orchestrator.cli.cmd_run",
    "meshpilot.orchestrator.cli.cmd_status",
    "meshpilot.orchestrator.cli.cmd_logs",
    "meshpilot.orchestrator.cli.cmd_cancel",
    "meshpilot.orchestrator.cli.cmd_simulate",
    "meshpilot.orchestrator.cli.cmd_plan",
    "meshpilot.orchestrator.cli.cmd_submit",
    "meshpilot.orchestrator.cli.cmd_export",
)


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="meshpilot", description="Plan, simulate and launch distributed training.")
    parser.add_argument("--version", action="version", version=f"meshpilot {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser, dict(sub.choices)


def _version() -> str:
    try:
        return importlib.metadata.version("meshpilot")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job file and dotlist overrides, shared by every command that reads a job."""
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotlist overrides, e.g. plan.zero_stage=3 cluster=dgx-h100 cluster.nodes=16")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _build()
    if argv and argv[0] in commands:
        # KEY=VALUE overrides may come anywhere on the line, also after options (dotlist tools' habit)
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"meshpilot: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``meshpilot plan ... | head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("meshpilot: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _USER_ERRNOS:
            raise
        # a path the user gave that the OS refuses (too long, not writable, disk full): one line
        where = f"{shown(e.filename)}: " if e.filename else ""
        print(f"meshpilot: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


# OS errors caused by the paths or the machine the user gave, not by meshpilot
_USER_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                          errno.ENOTDIR, errno.EISDIR, errno.ELOOP})


if __name__ == "__main__":
    sys.exit(main())
