"""``fedmerge certs``: every key and certificate a Flower deployment with TLS and node authentication needs.

Layout of the directory ``DIR`` it writes (nothing that exists is overwritten)::

    DIR/ca.crt, DIR/ca.key            a new certificate authority (ECDSA P-384, self-signed)
    DIR/server.pem, DIR/server.key    the SuperLink's certificate, signed by the CA; its
                                      subjectAltName names every ``--host`` plus 127.0.0.1 and
                                      localhost (the SuperLink's own ServerApp launcher dials
                                      127.0.0.1:PORT and verifies it against ca.crt)
    DIR/supernodes/NAME, NAME.pub     one ECDSA P-384 key pair per SuperNode in OpenSSH format: the
                                      private key for ``flower-supernode --auth-supernode-private-key``,
                                      the public key for ``flwr supernode register``
    DIR/register-supernodes.sh        ``flwr supernode register DIR/supernodes/NAME.pub CONNECTION
                                      --name NAME`` per key (run by the operator once the SuperLink runs)

``fedmerge serve --certificates DIR`` reads ca.crt, server.pem, server.key; give ``ca.crt`` and its own
``supernodes/NAME`` private key to each institution; keep ``ca.key`` offline.

:func:`check_certificates` is what ``fedmerge certs --check DIR --host H`` and ``fedmerge serve``'s
start-up run: the server certificate is signed by ca.crt, valid now, matches server.key and names each
host. A SuperNode that dials a host the certificate does not name finds out only at the institution:
Flower 1.42's ``flower-supernode`` logs "SSL/TLS handshake error detected. Exit Code: 305 … [SSL:
CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not valid for
'10.0.0.6'" (``Hostname mismatch`` for a DNS name) and exits 1; the check says it on the aggregation host
before any node dials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmerge.errors import ConfigError
from fedmerge.flower.tls import certificate_names, names_host

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
NODES_DIR = "supernodes"
REGISTER_SCRIPT = "register-supernodes.sh"
ALWAYS_NAMED = ("127.0.0.1", "localhost")
DEFAULT_CONNECTION = "fedmerge"
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertificateError(ConfigError):
    """A certificate directory that cannot serve the deployment (one line naming the file and the problem)."""


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair: ``private`` for flower-supernode, ``public`` for flwr supernode register."""

    name: str
    private: Path
    public: Path


@dataclass(frozen=True)
class CertificateSet:
    """What :func:`make_certificates` wrote (or found) in ``folder``."""

    folder: Path
    hosts: tuple[str, ...]
    nodes: tuple[NodeKey, ...]  # made by this call
    registered: tuple[NodeKey, ...]  # every key pair in the folder (the registration script's)
    created: tuple[Path, ...]

    @property
    def ca(self) -> Path:
        return self.folder / CA_CERT

    @property
    def register_script(self) -> Path:
        return self.folder / REGISTER_SCRIPT


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def validate_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name (``*.`` wildcard allowed), else ConfigError."""
    host = host.strip()
    if _is_ip(host):
        return host
    name = host[2:] if host.startswith("*.") else host
    if not name or ":" in host or not all(_DNS_LABEL.match(label) for label in name.rstrip(".").split(".")):
        raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name (no port, no scheme)")
    return host


def node_names(supernodes: int, names: Sequence[str]) -> list[str]:
    """Names of the SuperNode key pairs: the given ``names``, else ``supernode-1`` … ``supernode-N``."""
    if supernodes < 0:
        raise ConfigError(f"--supernodes {supernodes} must be 0 or more")
    if names and supernodes:
        raise ConfigError("give either --supernodes N or --supernode NAME (repeated), not both")
    chosen = list(names) if names else [f"supernode-{i}" for i in range(1, supernodes + 1)]
    for name in chosen:
        if not _NODE_NAME.match(name):
            raise ConfigError(
                f"--supernode {name!r}: use letters, digits, '.', '_' and '-' (at most 64, no leading symbol)"
            )
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ConfigError(f"--supernode names repeated: {duplicates}")
    return chosen


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created with mode 0600, never widened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if _is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        else:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _hosts_with_defaults(hosts: Sequence[str]) -> tuple[str, ...]:
    ordered: list[str] = []
    for host in [*(validate_host(h) for h in hosts), *ALWAYS_NAMED]:
        if host not in ordered:
            ordered.append(host)
    return tuple(ordered)


def _new_ca(folder: Path, now: dt.datetime, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmerge deployment CA"))
        .issuer_name(_name("fedmerge deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(folder / CA_KEY, _pem_key(key))
    _write_public(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _new_server_cert(
    folder: Path,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: dt.datetime,
    days: int,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(folder / SERVER_KEY, _pem_key(key))
    _write_public(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(folder: Path, name: str) -> NodeKey:
    """An ECDSA P-384 key pair in OpenSSH format (what flower-supernode and ``flwr supernode register``
    read) as ``folder/name`` (mode 0600) and ``folder/name.pub``; an existing file is ConfigError."""
    private, public = folder / name, folder / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} exists; choose another --supernode name or remove the old key pair")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    _write_public(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode(),
    )
    return NodeKey(name, private, public)


def registration_commands(nodes: Sequence[NodeKey], connection: str = DEFAULT_CONNECTION) -> list[str]:
    """``flwr supernode register PUB CONNECTION --name NAME`` for each key (Flower 1.42's command)."""
    return [
        f"flwr supernode register {shlex.quote(str(n.public))} {shlex.quote(connection)} "
        f"--name {shlex.quote(n.name)}"
        for n in nodes
    ]


def make_certificates(
    folder: Path,
    hosts: Sequence[str],
    supernodes: Sequence[str] = (),
    *,
    days: int = 365,
    connection: str = DEFAULT_CONNECTION,
) -> CertificateSet:
    """Write the CA, the SuperLink's certificate for ``hosts`` (+ 127.0.0.1, localhost) and one key pair
    per name in ``supernodes`` into ``folder`` (layout: the module docstring), and the registration script.

    A folder that already holds the CA and server certificate keeps them (new SuperNode keys are added;
    ``hosts`` must then already be named by server.pem — checked, CertificateError otherwise). Half a set
    (a CA without its key, a certificate without the CA) is refused rather than completed.
    """
    if days < 1:
        raise ConfigError(f"--days {days} must be at least 1")
    named = _hosts_with_defaults(hosts)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nodes_dir = folder / NODES_DIR
    present = {n: (folder / n).exists() for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    created: list[Path] = []
    if not any(present.values()):
        now = dt.datetime.now(dt.UTC)
        ca, ca_key = _new_ca(folder, now, days)
        _new_server_cert(folder, ca, ca_key, named, now, days)
        created += [folder / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    elif present[CA_CERT] and present[SERVER_CERT] and present[SERVER_KEY]:
        named = tuple(check_certificates(folder, hosts))  # keep what exists only if it serves these hosts
    else:
        have = sorted(n for n, p in present.items() if p)
        raise CertificateError(
            f"{folder} holds only {have} of a certificate set; remove them or use an empty directory"
        )
    nodes: list[NodeKey] = []
    if supernodes:
        nodes_dir.mkdir(exist_ok=True)
        nodes_dir.chmod(0o700)
        for name in supernodes:
            nodes.append(make_node_key(nodes_dir, name))
            created += [nodes[-1].private, nodes[-1].public]
    existing = sorted(p for p in nodes_dir.glob("*.pub")) if nodes_dir.is_dir() else []
    every = [NodeKey(p.stem, p.with_suffix(""), p) for p in existing]
    script = folder / REGISTER_SCRIPT
    if every:
        body = (
            "#!/bin/sh\n# run by the operator once the SuperLink runs (connection: $FLWR_HOME/config.toml)\n"
        )
        script.write_text(body + "\n".join(registration_commands(every, connection)) + "\n")
        script.chmod(0o755)
    return CertificateSet(folder, named, tuple(nodes), tuple(every), tuple(created))


def next_steps(made: CertificateSet, connection: str = DEFAULT_CONNECTION, port: int = 8000) -> str:
    """What ``fedmerge certs`` prints: the files written, the operator's connection, the registration
    commands and each new SuperNode's start line."""
    address = f"{made.hosts[0]}:{port}"
    lines = [f"wrote {path}" for path in made.created]
    lines += [
        "",
        f"SuperLink:  fedmerge serve --certificates {made.folder} ...  (names {', '.join(made.hosts)})",
        "operator, in $FLWR_HOME/config.toml:",
        f"  [superlink.{connection}]",
        f'  address = "{address}"',
        f'  root-certificates = "{made.ca.resolve()}"',
    ]
    if made.registered:
        lines.append(f"register the SuperNodes once the SuperLink runs (sh {made.register_script}):")
        lines += [f"  {line}" for line in registration_commands(made.registered, connection)]
    if made.nodes:
        lines.append("give each institution ca.crt and its own private key supernodes/NAME; it runs:")
        lines += [
            f"  flower-supernode --superlink {address} --root-certificates ca.crt "
            f"--auth-supernode-private-key {n.name} --node-config \"client-id='{n.name}' ...\""
            for n in made.nodes
        ]
    return "\n".join(lines)


def _load_cert(path: Path) -> x509.Certificate:
    if not path.is_file():
        raise CertificateError(f"{path} does not exist (make it with `fedmerge certs {path.parent}`)")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate ({exc})") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | object:
    if not path.is_file():
        raise CertificateError(f"{path} does not exist (make it with `fedmerge certs {path.parent}`)")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise CertificateError(f"{path} is encrypted; the SuperLink needs an unencrypted key") from None
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM private key ({exc})") from None


def check_certificates(
    folder: Path, hosts: Sequence[str] = (), *, now: dt.datetime | None = None
) -> list[str]:
    """Check ``folder``'s ca.crt, server.pem and server.key for a SuperLink reached as each of ``hosts``.

    Returns the names the certificate covers; raises CertificateError (one line, naming the file and
    the host) when server.pem is not signed by ca.crt, is outside its validity, does not match
    server.key, or does not name a host (127.0.0.1 included: the SuperLink's launcher dials it).
    """
    folder = Path(folder)
    ca = _load_cert(folder / CA_CERT)
    cert = _load_cert(folder / SERVER_CERT)
    key = _load_key(folder / SERVER_KEY)
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"{folder / SERVER_CERT} is not signed by {folder / CA_CERT}; SuperNodes trusting this ca.crt "
            "would refuse the SuperLink"
        ) from None
    for which, c in (("ca.crt", ca), ("server.pem", cert)):
        if now < c.not_valid_before_utc:
            raise CertificateError(
                f"{folder / which} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
        if now > c.not_valid_after_utc:
            raise CertificateError(
                f"{folder / which} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                f"make a new set with `fedmerge certs NEW_DIR`"
            )
    public = getattr(key, "public_key", None)
    if public is None or public().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(f"{folder / SERVER_KEY} is not the private key of {folder / SERVER_CERT}")
    names = certificate_names(cert)
    for host in [*hosts, "127.0.0.1"]:
        host = validate_host(host)
        if not names_host(cert, host):
            why = (
                "the SuperLink's own ServerApp launcher dials 127.0.0.1"
                if host == "127.0.0.1"
                else f"a SuperNode dialling {host} would stop with Flower's exit code 305 "
                f"(CERTIFICATE_VERIFY_FAILED, {'IP address' if _is_ip(host) else 'Hostname'} mismatch)"
            )
            raise CertificateError(
                f"{folder / SERVER_CERT} does not name {host!r} (it names {', '.join(names)}): {why}; "
                f"make a new set with `fedmerge certs NEW_DIR --host {host}`"
            )
    return names
