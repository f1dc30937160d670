"""The ``meshpilot`` command line. Each subcommand lives in its own ``cmd_*`` module that
exposes ``add_parser(subparsers)``; user mistakes (:class:`ConfigError`) exit with status 2
and a one-line message, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from meshpilot.orchestrator.errors import ConfigError

_COMMAND_MODULES = (
    "meshpilot.orchestrator.cli.cmd_presets",
    "meshpilot.orchestrator.cli.cmd_validate",
    "meshpilot.orchestrator.cli.cmd_probe",
    "meshpilot.orchestrator.cli.cmd_run",
    "meshpilot.orchestrator.cli.cmd_status",
    "meshpilot.orchestrator.cli.cmd_logs",
    "meshpilot.orchestrator.cli.cmd_cancel",
    "meshpilot.orchestrator.cli.cmd_simulate",
    "meshpilot.orchestrator.cli.cmd_plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpilot", description="Plan, simulate and launch distributed training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job file and dotlist overrides, shared by every command that reads a job."""
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotlist overrides, e.g. plan.zero_stage=3 cluster=dgx-h100 cluster.nodes=16")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"meshpilot: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshpilot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
