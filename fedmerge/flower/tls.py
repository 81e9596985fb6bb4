"""TLS material of the bulk channel and of a deployment, checked the same way on both sides.

A setting names a PEM file; :func:`read_certificates` and :func:`read_private_key` read it,
:func:`check_key_pair` checks a key and the first certificate of its chain are one pair and within
their validity, and :func:`names_host` applies gRPC's (RFC 6125) hostname rule: the subjectAltName's
DNS names and IP addresses (the common name only when there is no subjectAltName, and never for an
IP address), a ``*.`` wildcard covering exactly one leftmost label. Every failure is a
:class:`TlsMaterialError` naming the setting and the file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from fedmerge.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class TlsMaterialError(ConfigError):
    """A TLS file named by a setting is missing, unreadable, not PEM, not the key of its certificate,
    or outside its validity period; the message names the setting and the file."""


def _read(path: str | Path, setting: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise TlsMaterialError(f"{setting}={str(path)!r} is not a file; name a PEM file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise TlsMaterialError(f"{setting}={str(path)!r} cannot be read: {exc.strerror or exc}") from None


def read_certificates(path: str | Path, setting: str) -> list[x509.Certificate]:
    """The certificates of a PEM file (a chain or a CA bundle; at least one), else TlsMaterialError."""
    from cryptography import x509

    data = _read(path, setting)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsMaterialError(
            f"{setting}={str(path)!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----): {exc}"
        ) from None
    return certs


def read_private_key(path: str | Path, setting: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key of a file, else TlsMaterialError (gRPC takes no passphrase)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path, setting)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsMaterialError(
            f"{setting}={str(path)!r} is an encrypted private key; gRPC needs it unencrypted "
            "(e.g. openssl pkey -in KEY -out KEY.plain), readable by this process only"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsMaterialError(
            f"{setting}={str(path)!r} holds no PEM private key (-----BEGIN PRIVATE KEY-----): {exc}"
        ) from None


def check_validity(cert: x509.Certificate, setting: str, now: dt.datetime | None = None) -> None:
    """TlsMaterialError unless not_valid_before ≤ now ≤ not_valid_after (UTC)."""
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise TlsMaterialError(
            f"{setting}: the certificate for {cert.subject.rfc4514_string()} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it"
        )
    if now < cert.not_valid_before_utc:
        raise TlsMaterialError(
            f"{setting}: the certificate for {cert.subject.rfc4514_string()} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clocks or reissue it"
        )


def check_key_pair(
    cert_path: str | Path, key_path: str | Path, cert_setting: str, key_setting: str
) -> x509.Certificate:
    """The leaf (first) certificate of ``cert_path`` after checking that both files are PEM, that the
    key is the private key of that certificate (equal public keys) and that it is valid now."""
    from cryptography.hazmat.primitives import serialization

    leaf = read_certificates(cert_path, cert_setting)[0]
    key = read_private_key(key_path, key_setting)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsMaterialError(
            f"{key_setting}={str(key_path)!r} is not the private key of the certificate in "
            f"{cert_setting}={str(cert_path)!r}; pass the key the certificate was issued for"
        )
    check_validity(leaf, cert_setting)
    return leaf


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names a client may dial to reach ``cert``'s holder: its subjectAltName DNS names and IP
    addresses, or (no subjectAltName) its common name, as gRPC's hostname check reads them."""
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID, NameOID

    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert isinstance(san, x509.SubjectAlternativeName)
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def names_host(cert: x509.Certificate, host: str) -> bool:
    """True when ``host`` (a DNS name or an IP address) is one of :func:`certificate_names` (a DNS
    name may be a wildcard ``*.example.org`` for one leftmost label; an IP address is never matched
    against a common name)."""
    from cryptography.x509.oid import ExtensionOID

    host = host.strip("[]").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    has_san = any(e.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME for e in cert.extensions)
    if ip is not None and not has_san:
        return False
    for name in certificate_names(cert):
        name = name.rstrip(".").lower()
        if ip is not None:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                continue
        elif name == host or (name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]):
            return True
    return False
