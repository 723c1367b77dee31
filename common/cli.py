"""The `fedimaging` command: one entry point for what a user does, each subcommand being one of the project's own
commands (`fedimaging simulate` is `python -m server.simulate`, with the same options, messages and exit codes).

The subcommand's module is run in place of this process (exec), so signals, exit codes and output are its own, and
this module imports none of them (common/ never imports server/ or client/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PROG = "FEDIMAGING_PROG"  # the name a subcommand's --help and errors use for itself
STARTED_AS = os.environ.pop(PROG, None)  # read once, and not handed down to the processes a command starts

# (subcommand, how it runs: a module or a script of this project, who uses it: what it does)
COMMANDS = (
    ("simulate", "-m server.simulate", "anyone: a simulated federation on this machine (built-in data, a .npz, or site files)"),
    ("monitor", "-m server.monitor", "researcher: a live dashboard of the run folders, in a browser"),
    ("rehearse", "-m server.rehearse", "anyone: the whole deployment on loopback (TLS, node keys, proxy), stopped afterwards"),
    ("check-data", "-m client.check_data", "hospital: read a site's images as training would, before joining"),
    ("explain", "-m server.explain", "clinician: Grad-CAM pictures and predictions of a saved model on a folder of images"),
    ("superlink", "-m server.superlink", "server operator: the aggregation server (proxy, SuperLink), and registering hospitals"),
    ("supernode", "-m client.supernode", "hospital IT: the hospital's worker and SuperNode, with its checks"),
    ("certificates", "deploy/certificates.py", "server operator, hospital: the CA, the SuperLink's certificate, a hospital's key pair"),
)


def program(default: str) -> str:
    """The name a command calls itself in --help and errors: 'fedimaging <sub>' when started as one, else default."""
    return STARTED_AS or default


def usage() -> str:
    """`fedimaging --help`."""
    width = max(len(name) for name, _, _ in COMMANDS)
    lines = [f"  {name:<{width}}  {what}" for name, _, what in COMMANDS]
    return (
        "usage: fedimaging <command> [options]   (fedimaging <command> --help for its options)\n\n"
        "Federated training of a medical-image classifier across hospitals.\n\ncommands:\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named first in argv (in this process's place); 0 for --help, 2 for an unknown command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, *rest = argv
    target = next((how for command, how, _ in COMMANDS if command == name), None)
    if target is None:
        print(f"fedimaging: unknown command {name!r}; one of {', '.join(c for c, _, _ in COMMANDS)} (fedimaging --help)", file=sys.stderr)
        return 2
    how = target.split() if target.startswith("-m ") else [str(PROJECT / target)]
    os.environ[PROG] = f"fedimaging {name}"
    os.execv(sys.executable, [sys.executable, *how, *rest])
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
