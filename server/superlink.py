"""Run the aggregation server: the SuperLink (loopback only, TLS, node authentication, state in a database file), the
SuperExec that runs its ServerApps (behind a shared secret), and nginx in front, the one address hospitals reach,
answering the Fleet API only (server/stack.py). Then register each hospital's public key, which also writes the
roster that says which node is which hospital.

    python -m server.superlink --certs certs/ --listen 203.0.113.7:9092 [--state state/] [--internal-port 9091]
    python -m server.superlink register --certs certs/ [--state state/] --name st-marys --key st-marys.pub [--images 1200]
    python -m server.superlink --insecure --listen 127.0.0.1:9092   # local rehearsal only: no TLS, no node authentication

--listen is where hospitals connect: an address of this server's network interface that hospitals can reach (there
is no default: '0.0.0.0:9092' listens on every interface, and says so). The Control API (`flwr run`, `flwr ls`, `flwr
log`, `flwr stop`, `flwr supernode ...`) answers on 127.0.0.1:<internal-port> only: use it on this server, or through
an SSH tunnel. Runs and registered keys are kept in <state>/linkstate.db and survive a restart.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from common.cli import program
from common.deployment import INSECURE_WARNING
from common.errors import ConfigError
from common.tls import DeploymentError, check_server_files
from server.launch import RunFailed
from server.stack import describe, register_hospital, start_stack, stop_stack, supervise


def _listen(text: str) -> tuple[str, int]:
    """host:port of --listen."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected host:port, e.g. 203.0.113.7:9092")
    return host.strip("[]"), int(port)


def register_command_line() -> argparse.ArgumentParser:
    """`register`'s options."""
    parser = argparse.ArgumentParser(prog=program("python -m server.superlink") + " register", description="Register a hospital's SuperNode key and add it to the roster.")
    parser.add_argument("--certs", type=Path, help="the certificate folder: the roster is written there (roster.yaml)")
    parser.add_argument("--state", type=Path, default=Path("state"), help="the running server's state folder")
    parser.add_argument("--name", required=True, help="the hospital's name, as in its site file")
    parser.add_argument("--key", type=Path, required=True, help="the hospital's public key (<name>.pub)")
    parser.add_argument("--images", type=int, help="the number of images the hospital declared it holds")
    return parser


def _register(argv: list[str]) -> int:
    """`register`: a hospital's public key, with the SuperLink and in the roster."""
    args = register_command_line().parse_args(argv)
    try:
        hospital = register_hospital(args.state, args.certs, args.key, args.name, args.images)
    except (ConfigError, RunFailed, OSError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    print(f"fedimaging: registered {hospital.name} as node {hospital.node_id}")
    return 0


def command_line() -> argparse.ArgumentParser:
    """The server's start command's options."""
    parser = argparse.ArgumentParser(prog=program("python -m server.superlink"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, help="folder with ca.crt, superlink.crt and superlink.key (deploy/certificates.py)")
    parser.add_argument("--listen", type=_listen, required=True, help="host:port hospitals connect to (nginx listens here; no default)")
    parser.add_argument("--state", type=Path, default=Path("state"), help="where the database, secret, logs and proxy files are kept")
    parser.add_argument("--internal-port", type=int, default=9091, help="the SuperLink's own port, on 127.0.0.1 only")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: local rehearsal only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: check the certificates, start the server's processes, and keep them running until stopped."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["register"]:
        return _register(argv[1:])
    args = command_line().parse_args(argv)
    try:
        if not args.insecure:
            if args.certs is None:
                raise DeploymentError("no certificate folder: give --certs (made by deploy/certificates.py), or --insecure for a local rehearsal")
            check_server_files(args.certs / "ca.crt", args.certs / "superlink.crt", args.certs / "superlink.key")
        else:
            print(INSECURE_WARNING, file=sys.stderr)
        if args.listen[0] in ("0.0.0.0", "::"):
            print(f"fedimaging: note: --listen {args.listen[0]} answers hospitals on every network interface of this server", file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        stack = start_stack(args.state.resolve(), None if args.insecure else args.certs.resolve(), *args.listen, args.internal_port)
    except (DeploymentError, RunFailed) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    try:
        for line in describe(stack):
            print(f"fedimaging: {line}", flush=True)
        return supervise(stack)
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    sys.exit(main())
