"""Make the federation's certificates and keys, with the `cryptography` package Flower already installs.

    python deploy/certificates.py ca        --out certs/                      # once, by the server operator
    python deploy/certificates.py superlink --out certs/ --hosts fl.example.org,10.0.0.5
    python deploy/certificates.py hospital  --out certs/ --name st-marys      # once per hospital (or run at the hospital)
    python deploy/certificates.py show      certs/superlink.crt               # subject, names, expiry

Private keys are created readable by their owner only (mode 600 from the first byte), and no existing key or
certificate is replaced unless --force is given. The SuperLink's certificate also names 127.0.0.1 and localhost:
the proxy in front of it and its SuperExec reach it on loopback.

Files (see deploy/README.md for which goes where):
    ca.crt, ca.key                   the certificate authority; ca.key never leaves the server operator's safe
    superlink.crt, superlink.key     the SuperLink's TLS certificate (host names and addresses as SANs) and key
    hospitals/<name>, <name>.pub     a hospital's SuperNode key pair (ECDSA P-384, OpenSSH format); the private key
                                     never leaves the hospital, the public key is registered with the SuperLink
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS, SERVER_DAYS = 3650, 365


class Exists(FileExistsError):
    """A key or certificate would be replaced; the message says which and how to replace it on purpose."""


def _write(path: Path, data: bytes, private: bool, force: bool = False) -> Path:
    """Write a file created with its final mode (private keys 600: never readable by others, not even for an instant);
    an existing file is replaced only with force."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise Exists(f"{path} exists already: keep it, or pass --force to replace it (whatever used it stops working)")
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (protect it with file permissions, not a passphrase Flower cannot type)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(out: Path, name: str = "fedimaging federation CA", days: int = CA_DAYS, force: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate authority: (ca.crt, ca.key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA384())
    )  # fmt: skip
    return _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), False, force), _write(out / "ca.key", _pem_key(key), True, force)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    """Host names and IP addresses as subject alternative names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


LOOPBACK = ["127.0.0.1", "localhost"]  # the proxy and the SuperExec reach the SuperLink here


def make_superlink_cert(
    out: Path, hosts: list[str], days: int = SERVER_DAYS, valid_from: dt.datetime | None = None, force: bool = False
) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate signed by the CA in `out`, valid for the given hosts and loopback:
    (superlink.crt, superlink.key)."""
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK]))
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    start = valid_from or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    return (
        _write(out / "superlink.crt", cert.public_bytes(serialization.Encoding.PEM), False, force),
        _write(out / "superlink.key", _pem_key(key), True, force),
    )


def make_hospital_keys(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A hospital's SuperNode authentication key pair, ECDSA P-384 in OpenSSH format: (private key, public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    folder = out / "hospitals"
    return _write(folder / name, private, True, force), _write(folder / f"{name}.pub", public, False, force)


def describe(path: Path) -> str:
    """Subject, issuer, names and validity of a certificate, for renewal checks."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        names = ", ".join(str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = "none"
    left = (cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).days
    return (
        f"{path}: subject {cert.subject.rfc4514_string()}; issuer {cert.issuer.rfc4514_string()}; names {names}; "
        f"valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d} ({left} days left)"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: ca, superlink, hospital or show."""
    parser = argparse.ArgumentParser(prog=os.environ.get("FEDIMAGING_PROG", "python deploy/certificates.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca", help="make the certificate authority")
    superlink = sub.add_parser("superlink", help="make (or renew) the SuperLink's TLS certificate")
    superlink.add_argument("--hosts", required=True, help="comma-separated host names and IP addresses hospitals use to reach the SuperLink")
    superlink.add_argument("--days", type=int, default=SERVER_DAYS)
    hospital = sub.add_parser("hospital", help="make a hospital's SuperNode key pair")
    hospital.add_argument("--name", required=True)
    for p in (ca, superlink, hospital):
        p.add_argument("--out", type=Path, default=Path("certs"))
        p.add_argument("--force", action="store_true", help="replace existing files (whatever used them stops working)")
    show = sub.add_parser("show", help="print a certificate's names and expiry")
    show.add_argument("certificate", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "ca":
            if (args.out / "ca.key").exists() and not args.force:
                print(f"error: {args.out / 'ca.key'} exists already; a new CA would invalidate every certificate it signed (--force to do it anyway)", file=sys.stderr)
                return 2
            paths = make_ca(args.out, force=args.force)
        elif args.command == "superlink":
            if not (args.out / "ca.key").is_file():
                print(f"error: no CA in {args.out} (ca.crt, ca.key): run 'ca' first", file=sys.stderr)
                return 2
            paths = make_superlink_cert(args.out, [h.strip() for h in args.hosts.split(",") if h.strip()], args.days, force=args.force)
        elif args.command == "hospital":
            if not args.name.replace("-", "").replace("_", "").isalnum():
                print(f"error: --name {args.name!r}: use letters, digits, '-' and '_'", file=sys.stderr)
                return 2
            paths = make_hospital_keys(args.out, args.name, force=args.force)
        else:
            print(describe(args.certificate))
            return 0
    except Exists as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
