"""Make the files a secure Flower deployment needs: a local CA, TLS and SuperNode keys.

Writes into ``--out`` (default ``certificates/``):

- ``ca.key``, ``ca.crt``: a certificate authority for this federation (keep
  ``ca.key`` offline; ``ca.crt`` goes to every SuperNode and to the machine
  that runs ``flwr``);
- ``server.key``, ``server.pem``: the SuperLink's TLS key and certificate,
  signed by the CA, valid for the host names and addresses given with
  ``--host`` (default ``localhost`` and ``127.0.0.1``);
- ``supernode-<i>``, ``supernode-<i>.pub`` for i = 1..``--supernodes``: each
  SuperNode's authentication key pair (ECDSA P-384, OpenSSH format, what
  ``flower-supernode --auth-supernode-private-key`` reads); the ``.pub`` file
  is what ``flwr supernode register`` takes.

With ``--flower-config FILE --connection NAME --address HOST:PORT`` it also
writes the connection ``flwr`` uses to reach that SuperLink over TLS into the
Flower configuration file (``[superlink.NAME]`` with the address and the
*absolute* path of ``ca.crt``, which Flower 1.42 requires), replacing an
earlier section of that name.

Every key and certificate is made by the ``cryptography`` package. Existing
files are never replaced (``--force`` replaces them). ``--check`` verifies a
folder instead: every file present, the server certificate signed by the CA,
valid now and for the hosts, each key matching its certificate or public key.

Usage::

    python make_certificates.py --out certificates --supernodes 3 \
        --flower-config flwr_home/config.toml --connection fedpac-secure --address 127.0.0.1:9093
    python make_certificates.py --check certificates --supernodes 3
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.pem"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def supernode_files(count: int) -> list[tuple[str, str]]:
    """``(private key, public key)`` file names of SuperNodes 1..count."""
    return [(f"supernode-{i}", f"supernode-{i}.pub") for i in range(1, count + 1)]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate valid for ``days``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpac_hf federation CA"))
        .issuer_name(_name("fedpac_hf federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key and its certificate for ``hosts``, signed by the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_key() -> tuple[bytes, bytes]:
    """A SuperNode's authentication key pair: OpenSSH private key and public key."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public


def write(out: Path, hosts: Sequence[str], supernodes: int, days: int, force: bool) -> list[Path]:
    """Make every file in ``out``; refuse to replace existing ones unless ``force``."""
    names = [CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT]
    names += [name for pair in supernode_files(supernodes) for name in pair]
    existing = [out / n for n in names if (out / n).exists()]
    if existing and not force:
        raise SystemExit(
            f"error: {', '.join(map(str, existing))} exist already; keep them, choose another "
            "--out, or pass --force to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server(ca_key, ca_cert, hosts, days)
    files = {
        CA_KEY: _pem_key(ca_key),
        CA_CERT: ca_cert.public_bytes(serialization.Encoding.PEM),
        SERVER_KEY: _pem_key(server_key),
        SERVER_CERT: server_cert.public_bytes(serialization.Encoding.PEM),
    }
    for private_name, public_name in supernode_files(supernodes):
        files[private_name], files[public_name] = make_supernode_key()
    written = []
    for name, data in files.items():
        path = out / name
        path.write_bytes(data)
        if not name.endswith((".crt", ".pem", ".pub")):
            path.chmod(0o600)  # private keys: the owner only
        written.append(path)
    return written


def check(folder: Path, hosts: Sequence[str], supernodes: int) -> list[str]:
    """What is wrong with the files in ``folder`` (empty: nothing)."""
    problems = []
    needed = [CA_CERT, SERVER_KEY, SERVER_CERT]
    needed += [name for pair in supernode_files(supernodes) for name in pair]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        return [f"missing {folder / n}" for n in missing]
    ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    server_cert = x509.load_pem_x509_certificate((folder / SERVER_CERT).read_bytes())
    server_key = serialization.load_pem_private_key((folder / SERVER_KEY).read_bytes(), None)
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"{folder / SERVER_CERT} is not signed by {folder / CA_CERT}")
    if server_key.public_key() != server_cert.public_key():
        problems.append(f"{folder / SERVER_KEY} does not match {folder / SERVER_CERT}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not server_cert.not_valid_before_utc <= now <= server_cert.not_valid_after_utc:
        problems.append(f"{folder / SERVER_CERT} is not valid now")
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    covered = {str(v) for v in names.get_values_for_type(x509.DNSName)}
    covered |= {str(v) for v in names.get_values_for_type(x509.IPAddress)}
    for host in hosts:
        if host not in covered:
            problems.append(f"{folder / SERVER_CERT} is not valid for {host} (it covers {covered})")
    for private_name, public_name in supernode_files(supernodes):
        private = serialization.load_ssh_private_key((folder / private_name).read_bytes(), None)
        public = serialization.load_ssh_public_key((folder / public_name).read_bytes())
        if private.public_key() != public:
            problems.append(f"{folder / private_name} does not match {folder / public_name}")
    return problems


def write_connection(config: Path, name: str, address: str, ca_cert: Path) -> None:
    """Add (or replace) ``[superlink.<name>]`` in the Flower configuration file ``config``."""
    section = (
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca_cert.resolve()}"\n'
    )
    text = config.read_text() if config.exists() else ""
    header = re.compile(rf"^\[superlink\.{re.escape(name)}\]\s*$", re.M)
    found = header.search(text)
    if found:
        following = re.compile(r"^\[", re.M).search(text, found.end())
        end = following.start() if following else len(text)
        text = text[: found.start()] + section + ("\n" if following else "") + text[end:]
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + section
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("certificates"))
    parser.add_argument("--check", type=Path, help="verify this folder instead of writing")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--host", action="append", dest="hosts")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--flower-config", type=Path, help="Flower config.toml to add to")
    parser.add_argument("--connection", default="fedpac-secure")
    parser.add_argument("--address", help="the SuperLink's HOST:PORT for --flower-config")
    args = parser.parse_args(argv)
    hosts = args.hosts or list(DEFAULT_HOSTS)
    if args.supernodes < 1:
        parser.error("--supernodes must be at least 1")
    if args.check is not None:
        problems = check(args.check, hosts, args.supernodes)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(
                f"{args.check}: CA, SuperLink certificate and {args.supernodes} SuperNode keys OK"
            )
        return 1 if problems else 0
    if args.flower_config is not None and not args.address:
        parser.error("--flower-config needs --address, the SuperLink's HOST:PORT")
    for path in write(args.out, hosts, args.supernodes, args.days, args.force):
        print(path)
    if args.flower_config is not None:
        write_connection(args.flower_config, args.connection, args.address, args.out / CA_CERT)
        print(f"{args.flower_config}: [superlink.{args.connection}] at {args.address} over TLS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
