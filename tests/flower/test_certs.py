"""``fedmerge certs``: the CA, the SuperLink's certificate and SuperNode key pairs, and ``--check``.

The certificates are checked against Python's own TLS stack (a real handshake over localhost with
hostname verification), not only against :mod:`fedmerge.flower.certs`' reading of them; the node keys
are read back with the loader flower-supernode uses.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedmerge.errors import ConfigError
from fedmerge.flower import certs
from fedmerge.flower.certs import CertificateError, check_certificates, make_certificates
from fedmerge.flower.cli import app as flower_cli


def _handshake(folder: Path, server_hostname: str) -> None:
    """A TLS handshake against server.pem/server.key over 127.0.0.1, verifying ca.crt and the host name."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / "server.pem", folder / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(timeout=10)


def test_certificate_set_serves_its_hosts_in_a_real_tls_handshake(tmp_path: Path) -> None:
    made = make_certificates(tmp_path / "c", ["10.0.0.5", "agg.example.org"], ["inst-a", "inst-b"])
    assert made.hosts == ("10.0.0.5", "agg.example.org", "127.0.0.1", "localhost")
    for host in ("127.0.0.1", "localhost"):
        _handshake(made.folder, host)  # names a host → the handshake verifies
    for wrong in ("127.0.0.2", "other.example.org"):
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _handshake(made.folder, wrong)
        with pytest.raises(CertificateError, match=f"does not name '{wrong}'"):
            check_certificates(made.folder, [wrong])  # the check agrees with TLS
    names = check_certificates(made.folder, ["10.0.0.5", "agg.example.org", "AGG.example.org."])
    assert sorted(names) == sorted(made.hosts)
    # private keys are the owner's only
    for private in ("ca.key", "server.key", "supernodes/inst-a", "supernodes/inst-b"):
        assert stat.S_IMODE((made.folder / private).stat().st_mode) == 0o600, private
    ca = x509.load_pem_x509_certificate((made.folder / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_keys_are_what_flower_supernode_loads_and_the_script_registers_them(tmp_path: Path) -> None:
    made = make_certificates(tmp_path, [], ["inst-a", "inst-b"], connection="hospitals")
    assert [n.name for n in made.nodes] == ["inst-a", "inst-b"]
    for node in made.nodes:
        private = load_ssh_private_key(node.private.read_bytes(), password=None)
        public = load_ssh_public_key(node.public.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
    script = made.register_script.read_text().splitlines()
    assert script[-2:] == [
        f"flwr supernode register {tmp_path}/supernodes/inst-a.pub hospitals --name inst-a",
        f"flwr supernode register {tmp_path}/supernodes/inst-b.pub hospitals --name inst-b",
    ]
    # a second call keeps the CA and server certificate, adds a node, and refuses an existing name
    before = (tmp_path / "server.pem").read_bytes()
    again = make_certificates(tmp_path, [], ["inst-c"], connection="hospitals")
    assert (tmp_path / "server.pem").read_bytes() == before
    assert [n.name for n in again.nodes] == ["inst-c"]
    assert [n.name for n in again.registered] == ["inst-a", "inst-b", "inst-c"]
    assert len(made.register_script.read_text().splitlines()) == 2 + 3
    with pytest.raises(ConfigError, match="inst-a exists"):
        make_certificates(tmp_path, [], ["inst-a"])
    with pytest.raises(CertificateError, match=r"does not name '10\.0\.0\.9'"):
        make_certificates(tmp_path, ["10.0.0.9"], ["inst-d"])  # the kept certificate lacks the host


def test_check_names_each_problem_in_one_line(tmp_path: Path) -> None:
    a = make_certificates(tmp_path / "a", ["10.0.0.5"]).folder
    b = make_certificates(tmp_path / "b", ["10.0.0.5"]).folder
    check_certificates(a, ["10.0.0.5"])
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(CertificateError, match="expired on"):
        check_certificates(a, now=future)
    (tmp_path / "mixed").mkdir()
    for name, src in (("ca.crt", b), ("server.pem", a), ("server.key", a)):
        (tmp_path / "mixed" / name).write_bytes((src / name).read_bytes())
    with pytest.raises(CertificateError, match="is not signed by"):
        check_certificates(tmp_path / "mixed")
    (tmp_path / "mixed" / "ca.crt").write_bytes((a / "ca.crt").read_bytes())
    (tmp_path / "mixed" / "server.key").write_bytes((b / "server.key").read_bytes())
    with pytest.raises(CertificateError, match="is not the private key of"):
        check_certificates(tmp_path / "mixed")
    (tmp_path / "mixed" / "server.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match="is not a PEM certificate"):
        check_certificates(tmp_path / "mixed")
    with pytest.raises(CertificateError, match="does not exist"):
        check_certificates(tmp_path / "nothing")


def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        make_certificates(tmp_path / "x", ["https://agg:8000"])
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    with pytest.raises(ConfigError, match="not both"):
        certs.node_names(2, ["a"])
    with pytest.raises(ConfigError, match="repeated"):
        certs.node_names(0, ["a", "a"])
    with pytest.raises(ConfigError, match="use letters"):
        certs.node_names(0, ["../evil"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ca.crt").write_text("x")
    with pytest.raises(CertificateError, match="holds only"):
        make_certificates(tmp_path / "half", [])


def test_cli_writes_the_set_prints_the_registration_and_checks_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    folder = tmp_path / "certs"
    made = runner.invoke(flower_cli, ["certs", str(folder), "--host", "10.0.0.5", "--supernodes", "3"])
    assert made.exit_code == 0, made.output
    assert "flwr supernode register" in made.output and "--name supernode-3" in made.output
    assert 'address = "10.0.0.5:8000"' in made.output
    assert sorted(p.name for p in (folder / "supernodes").iterdir()) == [
        f"supernode-{i}{ext}" for i in (1, 2, 3) for ext in ("", ".pub")
    ]
    ok = runner.invoke(flower_cli, ["certs", "--check", str(folder), "--host", "10.0.0.5"])
    assert ok.exit_code == 0 and "names" in ok.output
    bad = runner.invoke(flower_cli, ["certs", "--check", str(folder), "--host", "10.0.0.6"])
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and "does not name '10.0.0.6'" in lines[0] and "exit code 305" in lines[0]
