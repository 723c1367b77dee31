"""Start this hospital's SuperNode: checks the site file, the federation's CA certificate, this hospital's key and
that the SuperLink answers over TLS, then connects (one line saying what to fix when something is wrong).

    python -m client.supernode --site deploy/sites/class-folders.yaml --superlink fl.example.org:9092 \\
        --ca certs/ca.crt --key certs/hospitals/st-marys

Run `python -m client.check_data <site file>` first. Every message this client sends is appended to the site's
audit log (<report-dir>/audit.jsonl).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.config import ConfigError
from common.deployment import INSECURE_WARNING, SuperNodeSetup, flower_process_env, supernode_command
from common.tls import DeploymentError


def main(argv: list[str] | None = None) -> int:
    """Command line: check, then become flower-supernode."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, required=True, help="this hospital's site YAML file")
    parser.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--key", type=Path, help="this hospital's private authentication key (never leaves the hospital)")
    parser.add_argument("--port", type=int, default=9094, help="the SuperNode's local runtime port (loopback only)")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: local rehearsal only")
    args = parser.parse_args(argv)
    try:
        command = supernode_command(SuperNodeSetup(args.site, args.superlink, args.ca, args.key, args.insecure, args.port))
    except (ConfigError, DeploymentError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    os.execve(command[0], command, {"TF_CPP_MIN_LOG_LEVEL": "2", **flower_process_env()})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
