"""The only door hospitals see: nginx in front of the SuperLink, answering the Fleet API (/v1/fleet/*, what a SuperNode
uses) and nothing else.

Flower 1.42 serves its Fleet, Control and Runtime APIs on one port, and the open-source Control API has no user
authentication: whoever reaches it can list, stop and submit runs and register keys. So the SuperLink listens on
loopback only, and nginx (Debian's package) listens where the operator says, with the federation's TLS certificate,
and passes POST /v1/fleet/* to the SuperLink over TLS; any other path or method is refused (404 or 405), never
passed on. Node authentication is untouched: SuperNodes sign their requests in headers, which nginx passes through.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.deployment import listening
from common.tls import DeploymentError

START_TIMEOUT = 20.0
MAX_BODY = "16m"  # Flower pushes objects in chunks of at most 5 MB


@dataclass(frozen=True)
class ProxySetup:
    """Where the proxy listens, where the SuperLink is, the certificates, and a private folder for nginx's files."""

    listen_host: str
    listen_port: int
    upstream_port: int  # the SuperLink's port on 127.0.0.1
    folder: Path  # nginx.conf, its pid, logs and temporary files
    certs: Path | None  # ca.crt, superlink.crt, superlink.key; None: plaintext (insecure rehearsal only)


def nginx_binary() -> str:
    """The nginx executable, or DeploymentError saying how to install it."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if not found:
        raise DeploymentError("nginx not found: install Debian's package (apt-get install nginx-light) or your system's nginx")
    return found


def _worker_user() -> str:
    """The user nginx's workers run as when it starts as root (it reads no file after start)."""
    for name in ("www-data", "nginx", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "nobody"


def nginx_config(setup: ProxySetup) -> str:
    """nginx.conf for the proxy: TLS to the hospitals, POST /v1/fleet/* to the SuperLink (TLS, its certificate
    verified), everything else refused; nothing written but its own logs (no request headers in them)."""
    folder = setup.folder.resolve()
    user = f"user {_worker_user()};\n" if os.geteuid() == 0 else ""
    temps = "".join(f"    {kind}_temp_path {folder / 'tmp' / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    listen = f"{setup.listen_host}:{setup.listen_port}" if ":" not in setup.listen_host else f"[{setup.listen_host}]:{setup.listen_port}"
    if setup.certs is not None:
        certs = setup.certs.resolve()
        tls = f"""        listen {listen} ssl;
        ssl_certificate {certs / 'superlink.crt'};
        ssl_certificate_key {certs / 'superlink.key'};
        ssl_protocols TLSv1.2 TLSv1.3;
"""
        upstream = f"""            proxy_pass https://127.0.0.1:{setup.upstream_port};
            proxy_ssl_trusted_certificate {certs / 'ca.crt'};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # the certificate names localhost (deploy/certificates.py adds it); nginx matches DNS names
"""
    else:
        tls = f"        listen {listen};\n"
        upstream = f"            proxy_pass http://127.0.0.1:{setup.upstream_port};\n"
    return f"""# Written by server/proxy.py: the Fleet API only. Any other path or method is refused here.
{user}worker_processes 1;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} warn;
events {{ worker_connections 512; }}
http {{
    access_log {folder / 'access.log'};
    server_tokens off;
{temps}    server {{
{tls}        client_max_body_size {MAX_BODY};
        client_body_buffer_size {MAX_BODY};
        location /v1/fleet/ {{
            limit_except POST {{ deny all; }}
            if ($request_uri !~ "^/v1/fleet/[a-z-]+$") {{ return 404; }}  # the request as sent: one Fleet route, nothing else
{upstream}            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def start_proxy(setup: ProxySetup, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Write nginx.conf into the setup's folder, check it, start nginx in the foreground and wait until it listens;
    DeploymentError (with nginx's own words) where it cannot."""
    binary = nginx_binary()
    (setup.folder / "tmp").mkdir(parents=True, exist_ok=True)
    conf = setup.folder / "nginx.conf"
    conf.write_text(nginx_config(setup))
    base = [binary, "-p", str(setup.folder.resolve()), "-c", str(conf.resolve())]
    checked = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, env=env)
    if checked.returncode != 0:
        raise DeploymentError(f"nginx refuses its configuration {conf}: {checked.stderr.strip().splitlines()[-1] if checked.stderr.strip() else 'no reason given'}")
    if listening(setup.listen_host, setup.listen_port):
        raise DeploymentError(f"{setup.listen_host}:{setup.listen_port} is in use already: choose another --listen address")
    with open(setup.folder / "nginx.out", "w") as log:  # nginx keeps its own copy of the file
        process = subprocess.Popen([*base, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not listening(setup.listen_host, setup.listen_port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            errors = (setup.folder / "error.log").read_text() if (setup.folder / "error.log").exists() else ""
            raise DeploymentError(f"nginx did not start listening on {setup.listen_host}:{setup.listen_port}: {errors.strip()[-500:] or 'see ' + str(setup.folder)}")
        time.sleep(0.1)
    return process
