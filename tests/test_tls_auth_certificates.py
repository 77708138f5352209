"""examples/flower_app/make_certificates.py: the files of a TLS deployment with SuperNode auth.

The keys and certificates are checked with the ``cryptography`` package itself
(signatures, key pairs, host names); ``--check`` must name each broken file.
The real deployment over TLS is ``tests/test_flower_readme.py``'s secure test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .flower_processes import APP

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

spec = importlib.util.spec_from_file_location("make_certificates", APP / "make_certificates.py")
certificates = importlib.util.module_from_spec(spec)
spec.loader.exec_module(certificates)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("tls") / "certificates"
    assert certificates.main(["--out", str(out), "--supernodes", "2"]) == 0
    return out


def test_tls_server_certificate_is_signed_by_the_ca_for_the_local_hosts(made):
    ca = x509.load_pem_x509_certificate((made / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((made / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key((made / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_auth_supernode_keys_are_openssh_pairs_as_flower_reads_them(made):
    for i in (1, 2):
        private = serialization.load_ssh_private_key((made / f"supernode-{i}").read_bytes(), None)
        public = serialization.load_ssh_public_key((made / f"supernode-{i}.pub").read_bytes())
        assert private.public_key() == public
        assert private.curve.name == "secp384r1"  # a NIST curve, as flwr supernode register wants
    private_mode = stat.S_IMODE(os.stat(made / "supernode-1").st_mode)
    assert private_mode == 0o600 and stat.S_IMODE(os.stat(made / "ca.key").st_mode) == 0o600
    assert certificates.check(made, ["localhost", "127.0.0.1"], 2) == []


def test_tls_files_are_never_replaced_without_force(made):
    before = (made / "ca.crt").read_bytes()
    with pytest.raises(SystemExit, match="exist already"):
        certificates.main(["--out", str(made), "--supernodes", "2"])
    assert (made / "ca.crt").read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d, o: (d / "server.pem").unlink(), "missing {d}/server.pem"),
        (
            lambda d, o: shutil.copy(o / "supernode-1", d / "supernode-2"),
            "{d}/supernode-2 does not match {d}/supernode-2.pub",
        ),
        (
            lambda d, o: shutil.copy(o / "server.key", d / "server.key"),
            "{d}/server.key does not match {d}/server.pem",
        ),
        (
            lambda d, o: shutil.copy(o / "ca.crt", d / "ca.crt"),
            "{d}/server.pem is not signed by {d}/ca.crt",
        ),
    ],
    ids=["missing-certificate", "auth-key-mismatch", "tls-key-mismatch", "other-ca"],
)
def test_tls_auth_check_names_the_broken_file(tmp_path, made, damage, named):
    folder = tmp_path / "broken"
    shutil.copytree(made, folder)
    other = tmp_path / "other"
    certificates.main(["--out", str(other), "--supernodes", "2"])
    damage(folder, other)
    problems = certificates.check(folder, ["localhost", "127.0.0.1"], 2)
    assert named.format(d=folder) in problems
    assert certificates.main(["--check", str(folder), "--supernodes", "2"]) == 1


def test_tls_check_names_a_host_the_certificate_does_not_cover(made):
    problems = certificates.check(made, ["flower.example.org"], 2)
    assert problems and "is not valid for flower.example.org" in problems[0]


def test_tls_connection_is_written_with_the_absolute_ca_path(tmp_path, made):
    config = tmp_path / "flwr_home" / "config.toml"
    config.parent.mkdir()
    shutil.copy(APP / "flower_config.toml", config)
    for address in ("127.0.0.1:9093", "127.0.0.1:9100"):  # the second call replaces the first
        certificates.write_connection(config, "fedpac-secure", address, made / "ca.crt")
    connections = tomllib.loads(config.read_text())["superlink"]
    assert connections["fedpac-secure"] == {
        "address": "127.0.0.1:9100",
        "root-certificates": str((made / "ca.crt").resolve()),
    }
    assert connections["fedpac-deployment"]["insecure"] is True  # the others untouched
    assert config.read_text().count("[superlink.fedpac-secure]") == 1
