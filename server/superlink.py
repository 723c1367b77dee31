"""Start the federation's SuperLink on the aggregation server, with TLS and node authentication, after checking its
certificates (one line saying what to fix if they are wrong).

    python -m server.superlink --certs certs/ [--port 9092] [--log-file superlink.log]
    python -m server.superlink --insecure          # local rehearsal only: no TLS, no node authentication

Then register each hospital's public key: flwr supernode register certs/hospitals/<name>.pub <connection>
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.deployment import INSECURE_WARNING, SuperLinkSetup, flower_process_env, superlink_command
from common.tls import DeploymentError


def main(argv: list[str] | None = None) -> int:
    """Command line: check, then become flower-superlink."""
    parser = argparse.ArgumentParser(prog="python -m server.superlink", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, help="folder with ca.crt, superlink.crt and superlink.key (deploy/certificates.py)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=9092, help="the one port hospitals and researchers connect to")
    parser.add_argument("--log-file", type=Path)
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: local rehearsal only")
    args = parser.parse_args(argv)
    try:
        command = superlink_command(SuperLinkSetup(args.host, args.port, args.certs, args.insecure, args.log_file))
    except DeploymentError as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    os.execve(command[0], command, flower_process_env())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
