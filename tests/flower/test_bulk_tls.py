"""TLS on the rounds' bulk endpoint: a real :class:`BulkEndpoint` serving TLS on localhost and real
:func:`upload_package` calls, certificates made in the test with ``cryptography`` (the server PKI by
``test_deployment.make_certificates``; other CAs and leaves by :func:`issue`).

Covered: an upload verified with the right CA (node config, ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, the
system bundle) lands in the spool and is judged like any bulk reply; a wrong CA, an expired server
certificate, a certificate for another name and a plaintext peer are refused at the handshake with
their cause; mutual TLS refuses a node without a certificate or with one from another CA; the
run-config keys are checked at parse time (files, PEM, key pair, validity, names, plaintext off
loopback). The slow test runs a round with real SuperLink and SuperNodes whose deltas go through a
TLS bulk endpoint, one node trusting the wrong CA: its reason is recorded and the round commits."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmerge.errors import ConfigError
from fedmerge.flower.client.bulk import (
    CLIENT_AUTH_KEY,
    GRPC_ROOTS_ENV,
    TLS_KEY,
    BulkTarget,
    BulkUploadFailed,
    NodeTls,
    upload_package,
)
from fedmerge.flower.config import parse_run_config
from fedmerge.flower.server.bulk_endpoint import BulkEndpoint, bulk_endpoint_for, make_token
from fedmerge.flower.tls import TlsMaterialError, names_host
from fedmerge.service.config import TlsConfig
from fedmerge.store import ModelStore

sys.path.insert(0, str(Path(__file__).parent))

from test_deployment import (
    BIN,
    _name,
    _pem_key,
    deployment,  # noqa: F401  (fixture)
    free_port,
    make_certificates,
)
from test_large_rounds import (
    InsecureDeployment,
    bulk_run_config,
    committed_rounds,
    insecure_deployment,  # noqa: F401  (fixture)
)

ROUND, ATTEMPT, NODE = 1, 0, 7
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
PAYLOAD = hashlib.sha256(b"seed-0").digest() * 40_000  # 1.25 MiB: two chunks


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(_pem_key(key))
    return Pair(folder / f"{name}.pem", folder / f"{name}.key")


def make_ca(folder: Path, name: str) -> tuple[Pair, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return _write(folder, name, cert, key), cert, key


def issue(
    folder: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    sans: list[x509.GeneralName],
    valid: tuple[dt.datetime, dt.datetime] = (NOW - DAY, NOW + DAY),
) -> Pair:
    """A leaf certificate ``name`` signed by ``ca`` (no subjectAltName when ``sans`` is empty)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(ca[0].subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )  # fmt: skip
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _write(folder, name, builder.sign(ca[1], hashes.SHA256()), key)


LOCAL = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


@dataclass(frozen=True)
class Pki:
    """The server's CA and certificate (``make_certificates``), another CA, and a client CA with one
    client certificate."""

    ca: Path
    server: Pair
    other_ca: Path
    other_ca_parts: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    client_ca: Path
    client: Pair
    stranger: Pair  # a client certificate from the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    certs = make_certificates(root / "server")
    other, other_cert, other_key = make_ca(root / "other", "other-ca")
    client_ca, ca_cert, ca_key = make_ca(root / "clients", "client-ca")
    client = issue(root / "clients", "hospital-a", (ca_cert, ca_key), [])
    stranger = issue(root / "other", "stranger", (other_cert, other_key), [])
    return Pki(
        certs / "ca.crt", Pair(certs / "server.pem", certs / "server.key"), other.cert,
        (other_cert, other_key), client_ca.cert, client, stranger,
    )  # fmt: skip


def tls_endpoint(tmp_path: Path, cert: Pair, client_ca: Path | None = None) -> BulkEndpoint:
    ep = BulkEndpoint(
        tmp_path / "spool", "127.0.0.1:0", max_bytes=64 << 20, reserve_bytes=0, threshold=0,
        tls=TlsConfig(cert.cert, cert.key, client_ca),
    )  # fmt: skip
    ep.start()
    ep.open_round(ROUND, ATTEMPT)
    return ep


def target_of(ep: BulkEndpoint, node: int = NODE) -> BulkTarget:
    """The target a node builds from its train message's settings (as ``keep_bulk_settings`` does)."""
    target = BulkTarget.from_settings(ep.settings_for(ROUND, ATTEMPT, node))
    assert target is not None
    return target


def spooled(ep: BulkEndpoint, sha: str) -> bytes | None:
    store = ep.router.open(ROUND, ATTEMPT)
    return store.path(sha).read_bytes() if store.has(sha) else None


# ----------------------------------------------------------------------------------- server TLS


def test_upload_verified_with_the_right_ca_reaches_the_spool(tmp_path: Path, pki: Pki) -> None:
    ep = tls_endpoint(tmp_path, pki.server)
    try:
        settings = ep.settings_for(ROUND, ATTEMPT, NODE)
        assert settings[TLS_KEY] is True and settings[CLIENT_AUTH_KEY] is False
        sha = upload_package(PAYLOAD, target_of(ep), node=NodeTls(root_certificates=str(pki.ca)))
        assert sha == hashlib.sha256(PAYLOAD).hexdigest()
        assert spooled(ep, sha) == PAYLOAD
        assert ep.resolve(sha, len(PAYLOAD), ROUND, ATTEMPT, NODE).read_bytes() == PAYLOAD
    finally:
        ep.stop()


def test_tls_upload_is_judged_like_any_bulk_reply(tmp_path: Path, pki: Pki) -> None:
    from test_large_rounds import bulk_reply

    from fedmerge_testing.hostile import FlowerRound

    fr = FlowerRound.open(tmp_path / "store")
    ep = tls_endpoint(tmp_path, pki.server)
    try:
        data = fr.valid(0).data
        sha = upload_package(data, target_of(ep, 3), node=NodeTls(root_certificates=str(pki.ca)))
        state = fr.state()
        state.bulk, state.attempt = ep, ATTEMPT
        out = state.judge(3, bulk_reply(3, sha, len(data)))
        assert out.accepted, out.reason
        assert out.codec is not None and out.codec["transport"] == "bulk"
    finally:
        ep.stop()


def test_system_roots_are_the_fallback(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bulk-root-certificates: GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else SSL_CERT_FILE."""
    ep = tls_endpoint(tmp_path, pki.server)
    try:
        monkeypatch.delenv(GRPC_ROOTS_ENV, raising=False)
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        assert upload_package(PAYLOAD, target_of(ep), node=NodeTls()) == hashlib.sha256(PAYLOAD).hexdigest()
        monkeypatch.setenv(GRPC_ROOTS_ENV, str(pki.other_ca))  # gRPC's own setting comes first
        with pytest.raises(BulkUploadFailed, match=f"not trusted by {GRPC_ROOTS_ENV}="):
            upload_package(PAYLOAD, target_of(ep, NODE + 1), node=NodeTls())
        monkeypatch.delenv(GRPC_ROOTS_ENV)
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca))
        with pytest.raises(BulkUploadFailed, match="not trusted by the system CA bundle"):
            upload_package(PAYLOAD, target_of(ep, NODE + 1), node=NodeTls())
    finally:
        ep.stop()


def test_wrong_ca_is_refused_at_the_handshake_without_retries(tmp_path: Path, pki: Pki) -> None:
    ep = tls_endpoint(tmp_path, pki.server)
    try:
        node = NodeTls(root_certificates=str(pki.other_ca))
        # a handshake verdict is final: not retried (a retried failure would say "failed after 4 attempts")
        with pytest.raises(BulkUploadFailed) as info:
            upload_package(PAYLOAD, target_of(ep), node=node, retries=3, backoff_s=0.01)
        message = str(info.value)
        assert f"not trusted by bulk-root-certificates={pki.other_ca}" in message, message
        assert "unable to get local issuer certificate" in message, message
        assert spooled(ep, hashlib.sha256(PAYLOAD).hexdigest()) is None
    finally:
        ep.stop()


def test_expired_and_misnamed_server_certificates_are_refused_with_their_cause(
    tmp_path: Path, pki: Pki
) -> None:
    node = NodeTls(root_certificates=str(pki.other_ca))  # the bad leaves come from the other CA
    expired = issue(tmp_path / "c", "expired", pki.other_ca_parts, LOCAL, (NOW - 3 * DAY, NOW - DAY))
    misnamed = issue(tmp_path / "c", "misnamed", pki.other_ca_parts, [x509.DNSName("bulk.example.org")])
    for pair, cause in ((expired, "certificate has expired"), (misnamed, "does not name '127.0.0.1'")):
        ep = tls_endpoint(tmp_path / pair.cert.stem, pair)
        try:
            with pytest.raises(BulkUploadFailed, match=cause):
                upload_package(PAYLOAD, target_of(ep), node=node, retries=3, backoff_s=0.01)
        finally:
            ep.stop()


def test_plaintext_and_tls_do_not_mix(tmp_path: Path, pki: Pki) -> None:
    ep = tls_endpoint(tmp_path / "tls", pki.server)
    try:  # a node dialling the TLS endpoint in plaintext is refused
        plain = BulkTarget(ep.address, make_token(ep.secret, ROUND, ATTEMPT, NODE), 0)
        with pytest.raises(BulkUploadFailed, match="failed after 1 attempts"):
            upload_package(PAYLOAD, plain, retries=0)
    finally:
        ep.stop()
    ep = BulkEndpoint(tmp_path / "plain", "127.0.0.1:0", max_bytes=1 << 30, reserve_bytes=0, threshold=0)
    ep.start()
    ep.open_round(ROUND, ATTEMPT)
    try:
        assert ep.settings_for(ROUND, ATTEMPT, NODE)[TLS_KEY] is False
        forced = BulkTarget(ep.address, make_token(ep.secret, ROUND, ATTEMPT, NODE), 0, tls=True)
        with pytest.raises(BulkUploadFailed, match="did not answer in TLS"):
            upload_package(PAYLOAD, forced, node=NodeTls(root_certificates=str(pki.ca)), backoff_s=0.01)
        # a node that requires TLS does not send its package to a plaintext endpoint
        with pytest.raises(BulkUploadFailed, match="bulk-require-tls=true"):
            upload_package(PAYLOAD, target_of(ep), node=NodeTls(require_tls=True))
        assert spooled(ep, hashlib.sha256(PAYLOAD).hexdigest()) is None
    finally:
        ep.stop()


# ------------------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_accepts_only_certificates_of_the_client_ca(tmp_path: Path, pki: Pki) -> None:
    ep = tls_endpoint(tmp_path, pki.server, client_ca=pki.client_ca)
    try:
        target = target_of(ep)
        assert target.tls and target.client_auth
        ca = str(pki.ca)
        with pytest.raises(BulkUploadFailed, match="requires a client certificate"):
            upload_package(PAYLOAD, target, node=NodeTls(root_certificates=ca))
        # without the node's own check (a target that does not say client-auth), the handshake refuses it
        unannounced = BulkTarget(target.address, target.token, 0, tls=True)
        with pytest.raises(BulkUploadFailed, match="failed after 1 attempts"):
            upload_package(PAYLOAD, unannounced, node=NodeTls(root_certificates=ca), retries=0)
        stranger = NodeTls(ca, str(pki.stranger.cert), str(pki.stranger.key))
        with pytest.raises(
            BulkUploadFailed, match="is it issued by the CA in the server's bulk-tls-client-ca"
        ):
            upload_package(PAYLOAD, target, node=stranger, retries=0)
        mismatched = NodeTls(ca, str(pki.client.cert), str(pki.stranger.key))
        with pytest.raises(BulkUploadFailed, match=r"bulk-client-key=.* is not the private key"):
            upload_package(PAYLOAD, target, node=mismatched)
        assert spooled(ep, hashlib.sha256(PAYLOAD).hexdigest()) is None
        good = NodeTls(ca, str(pki.client.cert), str(pki.client.key))
        sha = upload_package(PAYLOAD, target, node=good)
        assert spooled(ep, sha) == PAYLOAD
    finally:
        ep.stop()


def test_expired_client_certificate_is_reported_before_dialling(tmp_path: Path, pki: Pki) -> None:
    old = issue(tmp_path, "old", pki.other_ca_parts, [], (NOW - 3 * DAY, NOW - DAY))
    target = BulkTarget("127.0.0.1:1", "1.0.7.x", 0, tls=True, client_auth=True)  # nothing listens there
    with pytest.raises(BulkUploadFailed, match=r"bulk-client-cert: the certificate for CN=old expired on"):
        upload_package(PAYLOAD, target, node=NodeTls(str(pki.ca), str(old.cert), str(old.key)))


def test_client_certificate_is_only_presented_when_asked(tmp_path: Path, pki: Pki) -> None:
    """Without mutual TLS the node's (here expired) client certificate is neither checked nor sent."""
    old = issue(tmp_path, "old", pki.other_ca_parts, [], (NOW - 3 * DAY, NOW - DAY))
    ep = tls_endpoint(tmp_path, pki.server)
    try:
        sha = upload_package(PAYLOAD, target_of(ep), node=NodeTls(str(pki.ca), str(old.cert), str(old.key)))
        assert spooled(ep, sha) == PAYLOAD
    finally:
        ep.stop()


def test_certificate_names_follow_grpc_hostname_rules(tmp_path: Path, pki: Pki) -> None:
    def leaf(name: str, sans: list[x509.GeneralName]) -> x509.Certificate:
        pair = issue(tmp_path, name, pki.other_ca_parts, sans)
        return x509.load_pem_x509_certificate(pair.cert.read_bytes())

    san = leaf("san", [x509.DNSName("*.example.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))])
    assert names_host(san, "bulk.example.org") and names_host(san, "BULK.example.org.")
    assert not names_host(san, "example.org") and not names_host(san, "a.bulk.example.org")
    assert names_host(san, "10.0.0.5") and not names_host(san, "10.0.0.6")
    assert not names_host(san, "san")  # with a subjectAltName the common name does not count
    cn_only = leaf("127.0.0.1", [])
    assert not names_host(cn_only, "127.0.0.1")  # an IP address is never matched against a CN
    assert names_host(leaf("bulk-host", []), "bulk-host")


def test_node_config_keys_are_checked() -> None:
    assert NodeTls.from_node_config({"partition-id": 0}) == NodeTls()
    node = NodeTls.from_node_config(
        {"bulk-root-certificates": "/ca.pem", "bulk-client-cert": "/c.pem", "bulk-client-key": "/c.key",
         "bulk-require-tls": True}
    )  # fmt: skip
    assert node == NodeTls("/ca.pem", "/c.pem", "/c.key", True)
    with pytest.raises(TlsMaterialError, match="only one of bulk-client-cert and bulk-client-key"):
        NodeTls.from_node_config({"bulk-client-cert": "/c.pem"})
    with pytest.raises(TlsMaterialError, match="bulk-require-tls='yes' must be true or false"):
        NodeTls.from_node_config({"bulk-require-tls": "yes"})
    with pytest.raises(TlsMaterialError, match="must be a path"):
        NodeTls.from_node_config({"bulk-root-certificates": 3})


def test_missing_or_non_pem_ca_bundle_is_a_clear_failure(tmp_path: Path) -> None:
    target = BulkTarget("127.0.0.1:1", "1.0.7.x", 0, tls=True)
    with pytest.raises(BulkUploadFailed, match=r"bulk-root-certificates=.*nope\.pem' is not a file"):
        upload_package(PAYLOAD, target, node=NodeTls(root_certificates=str(tmp_path / "nope.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(BulkUploadFailed, match="holds no PEM certificate"):
        upload_package(PAYLOAD, target, node=NodeTls(root_certificates=str(junk)))


# -------------------------------------------------------------------------------- run config keys


def run_config(**keys: object) -> dict[str, object]:
    return {"bulk-address": "127.0.0.1:0", **{k.replace("_", "-"): v for k, v in keys.items()}}


def config_error(**keys: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config(**keys))
    return str(info.value)


def test_valid_tls_keys_build_a_tls_endpoint(tmp_path: Path, pki: Pki) -> None:
    cfg = parse_run_config(
        run_config(bulk_tls_cert=str(pki.server.cert), bulk_tls_key=str(pki.server.key),
                   bulk_tls_client_ca=str(pki.client_ca))
    )  # fmt: skip
    with ModelStore.open(tmp_path / "store") as store:
        ep = bulk_endpoint_for(cfg, store)
    assert ep.tls is not None and ep.tls.client_ca == pki.client_ca
    settings = ep.settings_for(1, 0, 1)
    assert settings[TLS_KEY] is True and settings[CLIENT_AUTH_KEY] is True
    # a public name the certificate carries, on a non-loopback bind
    public = run_config(bulk_address="0.0.0.0:9300", bulk_public_address="localhost:9300",
                        bulk_tls_cert=str(pki.server.cert), bulk_tls_key=str(pki.server.key))  # fmt: skip
    assert parse_run_config(public).bulk.public_address == "localhost:9300"


def test_plaintext_off_loopback_needs_bulk_allow_insecure(tmp_path: Path) -> None:
    message = config_error(bulk_address="10.0.0.5:9300")
    assert "not a loopback address" in message and "bulk-allow-insecure=true" in message
    assert "bulk-tls-cert" in message
    cfg = parse_run_config(run_config(bulk_address="10.0.0.5:9300", bulk_allow_insecure=True))
    assert cfg.bulk.allow_insecure
    for loopback in ("127.0.0.1:0", "localhost:9300", "[::1]:9300"):
        parse_run_config(run_config(bulk_address=loopback))
    with pytest.raises(ConfigError, match="not a loopback address"):
        BulkEndpoint(
            tmp_path, "0.0.0.0:0", "bulk.example.org:9300", max_bytes=1, reserve_bytes=0, threshold=0
        )


def test_bad_tls_files_are_named_at_parse_time(tmp_path: Path, pki: Pki) -> None:
    cert, key = str(pki.server.cert), str(pki.server.key)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    assert f"bulk-tls-cert='{tmp_path / 'x.pem'}' is not a file" in config_error(
        bulk_tls_cert=str(tmp_path / "x.pem"), bulk_tls_key=key
    )
    assert "bulk-tls-cert" in config_error(bulk_tls_cert=str(tmp_path), bulk_tls_key=key)  # a directory
    assert "holds no PEM certificate" in config_error(bulk_tls_cert=str(junk), bulk_tls_key=key)
    assert "holds no PEM private key" in config_error(bulk_tls_cert=cert, bulk_tls_key=cert)
    assert "is not the private key of the certificate" in config_error(
        bulk_tls_cert=cert, bulk_tls_key=str(pki.client.key)
    )
    assert "bulk-tls-key is empty" in config_error(bulk_tls_cert=cert)
    assert "bulk-tls-cert is empty" in config_error(bulk_tls_key=key)
    assert "mutual TLS needs both" in config_error(bulk_tls_client_ca=str(pki.client_ca))
    message = config_error(bulk_tls_cert=cert, bulk_tls_key=key, bulk_tls_client_ca=str(junk))
    assert "bulk-tls-client-ca=" in message and "holds no PEM certificate" in message
    assert "bulk-address is empty" in config_error(bulk_address="", bulk_tls_cert=cert, bulk_tls_key=key)


def test_encrypted_expired_or_misnamed_server_certificates_are_refused(tmp_path: Path, pki: Pki) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    locked = tmp_path / "locked.key"
    plain_key = load_pem_private_key(pki.server.key.read_bytes(), password=None)
    locked.write_bytes(
        plain_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )  # fmt: skip
    cert = str(pki.server.cert)
    assert "is an encrypted private key" in config_error(bulk_tls_cert=cert, bulk_tls_key=str(locked))
    expired = issue(tmp_path, "expired", pki.other_ca_parts, LOCAL, (NOW - 3 * DAY, NOW - DAY))
    message = config_error(bulk_tls_cert=str(expired.cert), bulk_tls_key=str(expired.key))
    assert "expired on" in message and "renew it" in message
    future = issue(tmp_path, "future", pki.other_ca_parts, LOCAL, (NOW + DAY, NOW + 2 * DAY))
    assert "is not valid before" in config_error(bulk_tls_cert=str(future.cert), bulk_tls_key=str(future.key))
    message = config_error(bulk_address="10.0.0.5:9300", bulk_tls_cert=cert, bulk_tls_key=str(pki.server.key))
    assert "does not name '10.0.0.5'" in message and "127.0.0.1" in message
    wildcard = issue(tmp_path, "wild", pki.other_ca_parts, [x509.DNSName("*.example.org")])
    ok = run_config(bulk_address="0.0.0.0:9300", bulk_public_address="bulk.example.org:9300",
                    bulk_tls_cert=str(wildcard.cert), bulk_tls_key=str(wildcard.key))  # fmt: skip
    parse_run_config(ok)
    ok["bulk-public-address"] = "a.bulk.example.org:9300"  # a wildcard covers one label
    with pytest.raises(ConfigError, match=r"does not name 'a\.bulk\.example\.org'"):
        parse_run_config(ok)


# ------------------------------------------------------------------------- a round, real processes


@pytest.mark.integration
@pytest.mark.slow
def test_round_over_a_tls_bulk_endpoint_records_a_node_with_the_wrong_ca(
    tmp_path: Path,
    pki: Pki,
    insecure_deployment: InsecureDeployment,  # noqa: F811
) -> None:
    """inst-0 trusts the server's CA, inst-1 another CA: inst-0's delta arrives through the TLS bulk
    endpoint and is merged; inst-1's reply is a failure whose reason names the untrusted certificate,
    and the round commits without it."""
    insecure_deployment.up(nodes=0)  # the SuperLink; the SuperNodes below carry bulk TLS node config
    for i, ca in enumerate((pki.ca, pki.other_ca)):
        node_config = f'partition-id={i} num-partitions=2 client-id="inst-{i}" bulk-root-certificates="{ca}"'
        insecure_deployment.start(
            f"supernode{i}",
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{insecure_deployment.port}",
             "--insecure", "--port", str(free_port()), "--node-config", node_config],
        )  # fmt: skip
    store, spool = tmp_path / "store", tmp_path / "spool"
    config = bulk_run_config(
        store, spool, **{"min-valid": 1, "max-retries": 0, "server-eval": "false",
                         "bulk-tls-cert": f"'{pki.server.cert}'", "bulk-tls-key": f"'{pki.server.key}'"}
    )  # fmt: skip
    run = insecure_deployment.flwr_run(config)
    out, _ = run.communicate(timeout=400)
    assert run.returncode == 0, out[-3000:] + insecure_deployment.tail()
    ((round_, people),) = committed_rounds(store)
    assert round_ == 1 and people[0] == ("inst-0", True, "bulk"), people
    with ModelStore.open(store) as st:
        version = next(v for v in st.list() if v.round == 1)
        failed = [c for c in st.get(version.id).contributors if not c.accepted]
    # a node whose reply is an error is recorded by its node id (its client id travels in the package)
    assert len(failed) == 1 and failed[0].client_id.startswith("node-"), failed
    reason = str(failed[0].reason)
    assert "client failed" in reason and "not trusted by bulk-root-certificates=" in reason, reason
    assert str(pki.other_ca) in reason, reason
    assert list(spool.iterdir()) == []
