"""The dashboard over real HTTP (uvicorn on a localhost port, plain urllib): pages, bad input, tokens."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmerge.dashboard import DashboardConfigError, NotAStoreError, RunningDashboard, start_in_background
from fedmerge.store import ModelStore


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) without following redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """A request whose path is sent byte for byte (urllib would normalise some of it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


@pytest.fixture(scope="module")
def served(small_store: Any) -> Iterator[RunningDashboard]:
    d = start_in_background(small_store.root, "127.0.0.1", 0, None)
    yield d
    d.stop()


def test_pages_render(served: RunningDashboard, small_store: Any) -> None:
    status, headers, body = get(served.url + "/versions")
    assert status == 200 and "text/html" in headers["content-type"]
    html = body.decode()
    for vid in small_store.versions:
        assert f'data-version="{vid}"' in html  # a node of the lineage graph and a table row
    assert 'class="rollback"' in html and 'data-alias="prod"' in html
    assert "default-src 'none'" in headers["content-security-policy"]
    status, _, body = get(served.url + f"/versions/{small_store.versions[-1]}")
    page = body.decode()
    assert status == 200
    assert small_store.rejected_reason.replace("'", "&#39;") in page
    assert 'id="diff"' in page and 'id="privacy"' in page
    status, _, body = get(served.url + "/run")
    assert status == 200 and 'id="chart-accuracy"' in body.decode() and "<polyline" in body.decode()


def test_alias_resolves_and_fingerprint_changes(served: RunningDashboard, small_store: Any) -> None:
    status, _, body = get(served.url + "/versions/prod")
    assert status == 200 and f"<h1>{small_store.versions[1]} " in body.decode()
    before = json.loads(get(served.url + "/api/fingerprint")[2])["fingerprint"]
    with ModelStore.open(small_store.root) as st:
        st.set_alias("fingerprint-test", small_store.versions[0])
    after = json.loads(get(served.url + "/api/fingerprint")[2])["fingerprint"]
    assert before != after


def test_export_download_is_the_store_export(
    served: RunningDashboard, small_store: Any, tmp_path: Path
) -> None:
    vid = small_store.versions[-1]
    status, headers, body = get(served.url + f"/versions/{vid}/export/hf.tar")
    assert status == 200 and headers["content-type"] == "application/x-tar"
    (tmp_path / "x.tar").write_bytes(body)
    with tarfile.open(tmp_path / "x.tar") as tar:
        names = tar.getnames()
    assert f"{vid}-hf/model.safetensors" in names and f"{vid}-hf/fedmerge-version.json" in names


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/versions/v999999", 404),
        ("/versions/no-such-alias", 404),
        ("/versions/..%2F..%2Fetc%2Fpasswd", 404),
        ("/versions/%2e%2e", 400),
        ("/versions/v000002%00", 400),
        ("/versions/v000002/export/zip.tar", 404),
        ("/versions/..%2Fstore.json/export/hf.tar", 404),
        ("/versions?limit=100000000", 400),
        ("/versions?limit=0", 400),
        ("/versions?limit=abc", 400),
        ("/versions?offset=-1", 400),
        ("/run?head=..%2F..%2Fetc%2Fpasswd", 400),
        ("/run?head=nope", 404),
        ("/static/..%2F__init__.py", 404),
        ("/static/../../../../etc/passwd", 404),
        ("/intake", 404),
        ("/nothing-here", 404),
    ],
)
def test_bad_input_is_a_plain_http_error(served: RunningDashboard, path: str, status: int) -> None:
    got, body = raw_get(served.port, path)
    text = body.decode(errors="replace")
    assert got == status, text[:500]
    assert "Traceback" not in text and 'File "' not in text
    assert "root:" not in text  # nothing of /etc/passwd


def test_dns_rebinding_host_is_refused(served: RunningDashboard) -> None:
    status, _, _ = get(served.url + "/versions", headers={"Host": "evil.example:80"})
    assert status == 400


def test_token_required_off_loopback(small_store: Any, dashboard_token: str) -> None:
    TOKEN = dashboard_token
    with pytest.raises(DashboardConfigError, match="pass a token"):
        start_in_background(small_store.root, "0.0.0.0", 0, None)
    with pytest.raises(DashboardConfigError, match="at least 16"):
        start_in_background(small_store.root, "0.0.0.0", 0, "short")
    with start_in_background(small_store.root, "0.0.0.0", 0, TOKEN) as d:
        vid = small_store.versions[-1]
        for path in ("/versions", f"/versions/{vid}", f"/versions/{vid}/export/hf.tar", "/api/fingerprint"):
            status, headers, body = get(d.url + path)
            assert status == 401, path
            assert b"PK" not in body[:4] and b"safetensors" not in body
            assert headers.get("www-authenticate", "").startswith("Bearer")
        assert get(d.url + "/versions", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        assert get(d.url + "/versions?token=wrong-token-0123456789")[0] == 401
        assert get(d.url + "/versions", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        status, headers, _ = get(d.url + f"/versions/{vid}?token={TOKEN}")
        assert status == 303 and headers["location"] == f"/versions/{vid}"
        cookie = headers["set-cookie"].split(";")[0]
        assert "httponly" in headers["set-cookie"].lower()
        assert get(d.url + f"/versions/{vid}", {"Cookie": cookie})[0] == 200
        assert get(d.url + "/static/dashboard.css")[0] == 200  # assets hold nothing of the store


def test_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    for path in (tmp_path / "missing", tmp_path / "other"):
        with pytest.raises(NotAStoreError, match="not a model store"):
            start_in_background(path, "127.0.0.1", 0, None)
    assert not (tmp_path / "missing").exists()  # never created


def test_cli_errors_are_one_line(tmp_path: Path, small_store: Any) -> None:
    exe = [sys.executable, "-m", "fedmerge.cli"]
    out = subprocess.run(
        [*exe, "dashboard", "--store", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a model store" in out.stderr
    out = subprocess.run(
        [*exe, "dashboard", "--store", str(small_store.root), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "pass a token" in out.stderr


def test_intake_page_reads_the_queue(small_store: Any, tmp_path: Path) -> None:
    """The intake's own queue (fedmerge.service.intake) with a merged, a rejected and a queued expert."""
    from fedmerge.service.intake import IntakeQueue

    data_dir = tmp_path / "intake"
    queue = IntakeQueue(data_dir)
    subs = []
    for i, client in enumerate(("alice", "bob", "carol")):
        payload = f"expert {i}".encode()
        sub, _ = queue.receive(
            client_id=client, fmt="checkpoint", base_version="v000001", label=f"e{i}",
            total_size=len(payload), chunks=[payload],
        )  # fmt: skip
        subs.append(sub)
    queue.mark_merged([subs[0].id], small_store.versions[-1])
    reason = "tensor 'layer.weight' has shape [4, 8], the base has [8, 4]; fine-tune the store's base"
    queue.mark_rejected(subs[1].id, reason)
    queue.close()
    with start_in_background(small_store.root, "127.0.0.1", 0, None, intake_dir=data_dir) as d:
        status, _, body = get(d.url + "/intake")
        html = body.decode()
        assert status == 200
        assert '<dd id="queue-depth">1</dd>' in html
        assert reason.replace("'", "&#39;") in html and "bob" in html
        assert f'href="/versions/{small_store.versions[-1]}"' in html
        assert 'id="chart-intake-rate"' in html and 'id="chart-intake-latency"' in html
        assert 'href="/intake"' in get(d.url + "/versions")[2].decode()


def test_missing_extra_names_the_install_command(small_store: Any) -> None:
    """Without starlette the dashboard says which extra to install (one line, exit 2), and
    ``fedmerge --help`` still works."""
    code = (
        "import sys; sys.modules['starlette'] = None; from fedmerge.cli import main; "
        f"main(['dashboard', '--store', {str(small_store.root)!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "pip install 'fedmerge[dashboard]'" in out.stderr
    code = "import sys; sys.modules['starlette'] = None; from fedmerge.cli import main; main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "dashboard" in out.stdout


def test_token_redirect_stays_on_the_dashboard(small_store: Any, dashboard_token: str) -> None:
    with start_in_background(small_store.root, "0.0.0.0", 0, dashboard_token) as d:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        conn.request("GET", f"//evil.example/x?token={dashboard_token}")
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == 303 and r.getheader("location") == "/evil.example/x"


def test_cli_serves_until_interrupted(small_store: Any) -> None:
    """``fedmerge dashboard`` prints its URL, serves the pages, and stops on SIGINT."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmerge.cli", "dashboard", "--store", str(small_store.root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert " on http://127.0.0.1:" in first, first + (
            proc.stderr.read() if proc.poll() is not None else ""
        )
        url = first.split(" on ", 1)[1].split()[0]
        status, _, body = get(url + "/versions")
        assert status == 200 and small_store.versions[-1] in body.decode()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_empty_and_root_only_stores_render(tmp_path: Path) -> None:
    """A store that a server has just created (no version), then one with only its root."""
    import torch

    ModelStore.open(tmp_path / "s").close()
    with start_in_background(tmp_path / "s", "127.0.0.1", 0, None) as d:
        for path in ("/versions", "/run", "/api/fingerprint"):
            assert get(d.url + path)[0] == 200, path
        assert "no versions yet" in get(d.url + "/versions")[2].decode()
        with ModelStore.open(tmp_path / "s") as st:
            st.commit_base({"w": torch.zeros(3)}, name="base")
        for path in ("/versions", "/run", "/versions/v000001", "/versions/latest"):
            assert get(d.url + path)[0] == 200, path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_mutual_tls_off_loopback(small_store: Any, tmp_path: Path) -> None:
    """Off loopback, client certificates (the intake's --tls-client-ca) authenticate instead of a token:
    without one the TLS handshake fails and nothing is served."""
    import ssl

    from fedmerge.service.config import TlsConfig

    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=dashboard-test-ca", cwd=d)  # fmt: skip
    for name, cn in (("server", "localhost"), ("client", "operator-a")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    with pytest.raises(DashboardConfigError, match="pass a token"):  # TLS alone authenticates nobody
        start_in_background(
            small_store.root, "0.0.0.0", 0, None, tls=TlsConfig(d / "server.pem", d / "server.key")
        )
    tls = TlsConfig(d / "server.pem", d / "server.key", d / "ca.pem")
    with start_in_background(small_store.root, "0.0.0.0", 0, None, tls=tls) as dash:
        assert dash.url.startswith("https://")
        url = f"https://localhost:{dash.port}/versions"
        anonymous = ssl.create_default_context(cafile=str(d / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(url, context=anonymous, timeout=30).read()
        client = ssl.create_default_context(cafile=str(d / "ca.pem"))
        client.load_cert_chain(d / "client.pem", d / "client.key")
        with urllib.request.urlopen(url, context=client, timeout=30) as r:
            assert r.status == 200 and small_store.versions[-1] in r.read().decode()
