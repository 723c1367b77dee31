"""Start-up checks of a deployment's certificates, keys and connection, each failing with one line that says what to fix."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


class DeploymentError(RuntimeError):
    """A deployment setting that cannot work; the message says what to fix."""


def _read(path: Path, what: str) -> bytes:
    """A file's bytes, or DeploymentError naming what it should have been."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DeploymentError(f"{what} {path}: cannot be read ({exc.strerror})") from exc


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """A PEM certificate that is valid now, or DeploymentError (missing, not PEM, expired, not yet valid)."""
    try:
        cert = x509.load_pem_x509_certificate(_read(path, what))
    except ValueError as exc:
        raise DeploymentError(f"{what} {path}: not a PEM certificate ({exc})") from exc
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise DeploymentError(f"{what} {path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; renew it (deploy/README.md, 'Renewing')")
    if cert.not_valid_before_utc > now:
        raise DeploymentError(f"{what} {path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock")
    return cert


def check_server_files(ca_file: Path, cert_file: Path, key_file: Path) -> None:
    """The SuperLink's certificate: valid now, signed by the CA, and matching its private key."""
    ca = load_certificate(ca_file, "CA certificate")
    cert = load_certificate(cert_file, "SuperLink certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise DeploymentError(f"SuperLink certificate {cert_file}: not signed by the CA {ca_file} ({type(exc).__name__})") from exc
    try:
        key = serialization.load_pem_private_key(_read(key_file, "SuperLink key"), None)
    except (ValueError, TypeError) as exc:
        raise DeploymentError(f"SuperLink key {key_file}: not an unencrypted PEM private key ({exc})") from exc
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise DeploymentError(f"SuperLink key {key_file} does not belong to the certificate {cert_file}")


def check_node_key(key_file: Path) -> None:
    """A SuperNode's authentication key: an OpenSSH private key file."""
    try:
        serialization.load_ssh_private_key(_read(key_file, "SuperNode key"), None)
    except (ValueError, TypeError) as exc:
        raise DeploymentError(f"SuperNode key {key_file}: not an unencrypted OpenSSH private key ({exc})") from exc


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the server at host:port completes a TLS handshake (certificate not checked: only the protocol)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, context.wrap_socket(sock, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def probe_superlink(address: str, ca_file: Path | None, timeout: float = 10.0) -> None:
    """Connect to the SuperLink and, with a CA, complete a TLS handshake that verifies its certificate and host name;
    without one (insecure mode), make sure the SuperLink does not expect TLS."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeploymentError(f"SuperLink address {address!r}: expected host:port")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            if ca_file is not None:
                context = ssl.create_default_context(cafile=str(ca_file))
                with context.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLCertVerificationError as exc:
        raise DeploymentError(f"SuperLink {address}: its certificate does not verify against {ca_file}: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        raise DeploymentError(f"SuperLink {address}: TLS handshake failed ({exc.reason}); is it running with TLS?") from exc
    except OSError as exc:
        raise DeploymentError(f"SuperLink {address} does not answer ({exc.strerror or exc}); check the address, that it runs, and the firewall") from exc
    if ca_file is None and _speaks_tls(host, int(port), timeout):
        raise DeploymentError(f"SuperLink {address} runs with TLS: connect without --insecure, with the federation's CA certificate (--ca) and this hospital's key (--key)")
