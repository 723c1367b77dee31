"""A live dashboard of the run folders, in a browser: every run with its state, and each run's figures, hospitals,
events and pictures, updated within seconds of a round being written, without a reload. Read-only: it reads run
folders (server/run_reader.py) and never writes into them. Charts are drawn by Plotly's JavaScript, served from the
installed plotly package: nothing is fetched from the internet.

    fedimaging monitor [RUNS_FOLDER]                       # http://127.0.0.1:8765/ (loopback only, no token)
    fedimaging monitor runs/ --host 0.0.0.0 --certfile monitor.crt --keyfile monitor.key [--token-file token.txt]

Loopback is the default, and the safe way to reach a deployed server's monitor is an SSH tunnel
(ssh -L 8765:127.0.0.1:8765 aggregation-server). Binding any other address needs TLS (--certfile, --keyfile) and a
token: every request must carry it (the page's ?token=... once, then a cookie, or an `Authorization: Bearer` header).
Without --token-file a random token is made and printed at start. On loopback, requests naming another host are
refused (a web page elsewhere cannot reach the monitor through DNS rebinding).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import mimetypes
import re
import secrets
import signal
import ssl
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common.cli import program
from server.run_reader import StallRule, detail, is_run, list_runs, run_state, stamp

PAGE = Path(__file__).resolve().parent / "monitor_page"
COOKIE = "fedimaging_monitor"
FILES = re.compile(r"(plots/round_\d{3}\.png|gradcam/round_\d{3}/grid\.png|history\.png|best_model\.png)")  # what the page shows of a run
TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")  # a token that travels safely in a URL and a cookie
MAX_CONNECTIONS = 64  # connections served at once
IDLE_SECONDS = 20  # a connection silent this long (TLS handshake, request, reading the answer) is closed


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitor serves and to whom."""

    runs: Path
    host: str = "127.0.0.1"
    port: int = 8765
    token: str = ""  # required on every request when set
    certfile: Path | None = None
    keyfile: Path | None = None
    stall: StallRule = StallRule()


def loopback(host: str) -> bool:
    """True for an address only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: MonitorConfig) -> None:
    """ValueError, saying what to add, where the monitor would listen beyond loopback without TLS and a token."""
    if loopback(cfg.host):
        return
    lacking = [what for what, have in (("--certfile and --keyfile (TLS)", cfg.certfile and cfg.keyfile), ("a token", cfg.token)) if not have]
    if lacking:
        raise ValueError(
            f"--host {cfg.host} reaches beyond this machine: the monitor then needs {' and '.join(lacking)}; "
            "or keep the default 127.0.0.1 and use an SSH tunnel (ssh -L 8765:127.0.0.1:8765 this-server)"
        )


def plotly_js() -> Path:
    """Plotly's JavaScript bundle, as the installed plotly package ships it."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def handler(cfg: MonitorConfig) -> type[BaseHTTPRequestHandler]:
    """The request handler for this monitor."""
    root = cfg.runs.resolve()

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedimaging-monitor"
        timeout = IDLE_SECONDS  # on the socket: a client that stalls (TLS handshake included) loses its connection

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            """Quiet: the console is for the operator's lines."""

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            """Answer, or say in one line on the console what went wrong and answer 500."""
            try:
                self._answer()
            except (ConnectionError, TimeoutError):
                raise
            except Exception as exc:  # noqa: BLE001 - one bad request or run folder must not take the monitor down
                print(f"fedimaging monitor: {self.path[:200]!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"the monitor could not answer this (said on its console)\n", "text/plain")

        def _answer(self) -> None:
            """A page, a static file, an API call or a run's picture."""
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            path = urllib.parse.unquote(url.path)
            if any(ord(c) < 32 for c in path):
                return self._send(HTTPStatus.BAD_REQUEST, b"control characters in the path\n", "text/plain")
            if not self._host_allowed():
                return self._send(HTTPStatus.FORBIDDEN, b"this monitor answers only requests to its own address\n", "text/plain")
            given = self._token(query)
            if cfg.token and not hmac.compare_digest(given.encode(), cfg.token.encode()):
                return self._send(HTTPStatus.UNAUTHORIZED, b"a token is needed: open the address printed when the monitor started\n", "text/plain")
            if cfg.token and "token" in query:  # keep it in a cookie, and out of the address bar and the history
                return self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", cookie=True, location="/" + (f"#{url.fragment}" if url.fragment else ""))
            if path in ("/", "/index.html"):
                return self._file(PAGE / "index.html")
            if path.startswith("/static/"):
                name = path.removeprefix("/static/")
                source = plotly_js() if name == "plotly.min.js" else PAGE / name
                if "/" in name or not source.is_file():
                    return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                return self._file(source)
            if path == "/api/runs":
                return self._json(list_runs(root, rule=cfg.stall))
            parts = path.strip("/").split("/")
            if len(parts) >= 3 and parts[:2] == ["api", "runs"]:
                folder = self._run(parts[2])
                if folder is None:
                    return self._send(HTTPStatus.NOT_FOUND, b"no such run\n", "text/plain")
                if len(parts) == 3:
                    return self._json(detail(folder, rule=cfg.stall))
                if parts[3:] == ["stamp"]:
                    return self._json({"stamp": stamp(folder), "state": run_state(folder, rule=cfg.stall)})
            if len(parts) >= 3 and parts[0] == "files":
                folder, name = self._run(parts[1]), "/".join(parts[2:])
                target = (folder / name).resolve() if folder is not None and FILES.fullmatch(name) else None
                if target is None or not target.is_relative_to(folder) or not target.is_file():
                    return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                return self._file(target)
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        def do_POST(self) -> None:  # noqa: N802 - the base class's name
            """Nothing is changed through the monitor."""
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"the monitor is read-only\n", "text/plain")

        do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

        def _host_allowed(self) -> bool:
            """On loopback, only requests addressed to loopback (no DNS rebinding); elsewhere the token guards."""
            if not loopback(cfg.host):
                return True
            host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
            return loopback(host)

        def _token(self, query: dict) -> str:
            """The token the request carries: ?token=, the cookie, or a bearer header."""
            if "token" in query:
                return query["token"][0]
            bearer = self.headers.get("Authorization", "")
            if bearer.startswith("Bearer "):
                return bearer.removeprefix("Bearer ")
            for part in (self.headers.get("Cookie") or "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    return value
            return ""

        def _run(self, name: str) -> Path | None:
            """The run folder of that name directly under the runs folder, or None."""
            folder = (root / name).resolve()
            return folder if folder.parent == root and is_run(root / name) else None

        def _json(self, value) -> None:
            """Answer with JSON (never cached: it changes as the run goes)."""
            self._send(HTTPStatus.OK, json.dumps(value, allow_nan=False).encode(), "application/json")

        def _file(self, path: Path) -> None:
            """Answer with a file's bytes."""
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            self._send(HTTPStatus.OK, path.read_bytes(), kind)

        def _send(self, code: HTTPStatus, body: bytes, kind: str, cookie: bool = False, location: str = "") -> None:
            """One whole answer."""
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")  # another site's page cannot probe runs by their pictures
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
            if location:
                self.send_header("Location", location)
            if cookie:
                secure = "; Secure" if cfg.certfile else ""
                self.send_header("Set-Cookie", f"{COOKIE}={cfg.token}; HttpOnly; SameSite=Strict; Path=/{secure}")
            self.end_headers()
            self.wfile.write(body)

    return Handler


class MonitorServer(ThreadingHTTPServer):
    """A threading HTTP server with a bound on connections at once (one over it is closed at once), that says a broken
    connection in one line (plain HTTP to TLS, a scanner), not a traceback."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler_class: type[BaseHTTPRequestHandler]) -> None:
        """Listen; at most MAX_CONNECTIONS connections are served at once."""
        super().__init__(address, handler_class)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        """Serve the connection in a thread of its own, or close it when every slot is taken."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        """The connection's thread gives its slot back when done."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """One line on the console per connection that failed."""
        error = sys.exc_info()[1]
        print(f"fedimaging monitor: a connection from {client_address[0]} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def make_server(cfg: MonitorConfig) -> ThreadingHTTPServer:
    """The monitor's HTTP(S) server, bound and ready to serve_forever; ValueError where the exposure is not allowed."""
    check_exposure(cfg)
    server = MonitorServer((cfg.host, cfg.port), handler(cfg))
    if cfg.certfile and cfg.keyfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cfg.certfile, cfg.keyfile)
        # the handshake on the first read, in the request's own thread: a client that never finishes it holds up no one else
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def address(cfg: MonitorConfig, port: int) -> str:
    """The page's address as printed at start (with the token, which the page then keeps in a cookie)."""
    scheme = "https" if cfg.certfile else "http"
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"{scheme}://{host}:{port}/" + (f"?token={cfg.token}" if cfg.token else "")


def main(argv: list[str] | None = None) -> int:
    """Command line: serve until Ctrl-C; 2 on bad arguments or an exposure that is not allowed."""
    parser = argparse.ArgumentParser(prog=program("python -m server.monitor"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", type=Path, default=Path("runs"), help="the folder holding the run folders (default: runs)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="the port (default 8765; 0: any free one)")
    parser.add_argument("--certfile", type=Path, help="TLS certificate (PEM), needed beyond loopback")
    parser.add_argument("--keyfile", type=Path, help="TLS private key (PEM), needed beyond loopback")
    parser.add_argument("--token-file", type=Path, help="a file holding the token every request must carry (default beyond loopback: a new random one)")
    parser.add_argument("--stall-factor", type=float, default=StallRule.factor, help="a running run is stalled after this many times its longest round without a new one (default 5)")
    args = parser.parse_args(argv)
    if args.runs.exists() and not args.runs.is_dir():
        print(f"fedimaging monitor: error: {args.runs} is not a folder (run folders are written under output-dir, by default runs/)", file=sys.stderr)
        return 2
    if not args.runs.exists():  # started before the first run: its runs appear once it makes the folder
        print(f"fedimaging monitor: {args.runs} does not exist yet; its runs will appear as they start", flush=True)
    try:
        token = args.token_file.read_text().strip() if args.token_file else ""
        if args.token_file and not TOKEN.fullmatch(token):
            raise ValueError(f"--token-file {args.token_file}: a token of at least 16 letters, digits or . _ ~ - is needed")
        if not token and not loopback(args.host):
            token = secrets.token_urlsafe(24)
        cfg = MonitorConfig(args.runs, args.host, args.port, token, args.certfile, args.keyfile, StallRule(factor=args.stall_factor))
        server = make_server(cfg)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"fedimaging monitor: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    where = "this machine only" if loopback(cfg.host) else "BEYOND THIS MACHINE, over TLS, with the token"
    print(f"fedimaging monitor: {cfg.runs.resolve()} ({len(list_runs(cfg.runs))} runs) at {address(cfg, server.server_address[1])} ({where}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("fedimaging monitor: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
