"""Browser tests under the one `PolicyEngine`: Playwright (Chromium) requests and DOM changes.

Every request a guarded browser context makes becomes a `browser.request` event (target: the
URL; op: the method; detail: resource type and initiator) decided by the engine with the running
test's config: allowed requests go out, denied ones are aborted, redirected ones are fulfilled
from a local stub. What is covered:

- `context.route`, so every page of the context (popups' first requests included) is covered;
- every hop of a redirect chain: Chromium follows redirects without asking the routes again, so
  the browser sandhop launches sends all its traffic through an egress proxy the guard runs on
  loopback in the test process: a request the routes already decided passes, anything else
  (each redirect hop, whatever else bypassed the routes) is decided there before it is sent;
- WebSockets (`context.route_web_socket`): the handshake URL is decided; denied sockets close;
- service workers are blocked (`service_workers="block"` on every context the fixtures make),
  so no request escapes the context's routes through a worker.

DOM changes are **observed only**: an init script's MutationObserver reports added external
scripts, inline scripts, iframes and forms, form-action changes and changed URL or handler
attributes (src, href, action, formaction, srcdoc, on*) through an exposed binding, summarised
(one event per distinct change per 50 ms batch, with a count; changes that can lead to a request,
such as an external script, an iframe or a form action, are reported at once) so a busy page
cannot flood the trace. They become `dom.mutation` events in the trace; nothing is blocked on their account (the
requests they lead to are decided like any other).

Events go through the process's tracer (`--sandhop-record`: the same trace as the test's Python
events, attributed to the test and phase) and decisions through its guard (`--sandhop-policy`:
denials fail the test out of band and reach the audit log). Without either, a context runs under
`engine`/`config` if given, else unguarded.

Pytest fixtures (this module is a pytest plugin): `sandhop_browser` (Debian's Chromium, launched
once per session with a fresh profile and background networking disabled), `sandhop_context`
and `sandhop_page` (guarded, per test). Override `sandhop_host_rules` (`MAP name address`
entries, comma separated, in Chromium's `--host-resolver-rules` syntax; the egress proxy applies
them) to map test host names to loopback. Playwright contexts made
any other way (pytest-playwright's `context`/`page` fixtures included) are guarded too while a
sandhop guard or recorder is active: `Browser.new_context` is wrapped to attach the guard.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any
import select
import socketserver
from collections import Counter
from fnmatch import fnmatchcase
from urllib.parse import urljoin, urlsplit

import pytest

from sandhop.enforcement import events as ev
from sandhop.enforcement.engine import Decision, PolicyEngine, SandboxConfig

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ("--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--no-first-run", "--no-default-browser-check",
                 "--disable-client-side-phishing-detection", "--disable-domain-reliability",
                 "--metrics-recording-only",
                 # One --disable-features switch replaces Playwright's own list, so it is repeated here
                 # (what stops Chromium's own start-up traffic: network time, search preconnects, hints)
                 # plus the Local Network Access checks, which would refuse a routed page's loopback
                 # connections; the engine decides every request instead.
                 "--disable-features=" + ",".join((
                     "AvoidUnnecessaryBeforeUnloadCheckSync", "DestroyProfileOnBrowserClose", "HttpsUpgrades",
                     "HttpsFirstBalancedModeAutoEnable", "LensOverlay", "MediaRouter", "PaintHolding",
                     "ThirdPartyStoragePartitioning", "AvoidCorsURLLoaderRestartOnRedirect", "OptimizationHints",
                     "NetworkTimeServiceQuerying", "AimEnabled", "PreconnectToSearch", "Translate",
                     "LocalNetworkAccessChecks", "BlockInsecurePrivateNetworkRequests")))

DOM_OBSERVER = r"""
(() => {
  if (window.__sandhopObserving) return;
  window.__sandhopObserving = true;
  const send = window.__sandhop_dom;
  const pending = new Map();
  const URGENT = new Set(["script.external", "iframe.add", "form.action", "form.add"]);
  let timer = null;
  const flush = () => {
    timer = null;
    const batch = [...pending.values()];
    pending.clear();
    if (batch.length) { try { send(batch); } catch (e) {} }
  };
  const report = (op, target, how) => {
    const key = op + "\u0000" + target + "\u0000" + how;
    const seen = pending.get(key);
    if (seen) { seen.count += 1; } else { pending.set(key, {op, target, how, count: 1}); }
    // what can lead to a request goes out at once; the rest in 50 ms batches
    if (URGENT.has(op) || pending.size >= 200) { flush(); } else if (timer === null) { timer = setTimeout(flush, 50); }
  };
  const abs = (u) => { try { return new URL(u, document.baseURI).href; } catch (e) { return String(u); } };
  const how = () => (document.readyState === "loading" ? "parser" : "script");
  const added = (node) => {
    if (node.nodeType !== 1) return;
    const tag = node.tagName;
    if (tag === "SCRIPT") {
      const src = node.getAttribute("src");
      report(src ? "script.external" : "script.inline", src ? abs(src) : location.href, how());
    } else if (tag === "IFRAME" || tag === "FRAME") {
      report("iframe.add", abs(node.getAttribute("src") || "about:blank"), how());
    } else if (tag === "FORM") {
      report("form.add", abs(node.getAttribute("action") || location.href), how());
    }
    if (node.children && node.children.length) {
      for (const child of node.querySelectorAll("script,iframe,frame,form")) added(child);
    }
  };
  const URL_ATTRS = new Set(["src", "href", "action", "formaction"]);
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === "childList") {
        for (const n of m.addedNodes) added(n);
      } else if (m.type === "attributes") {
        const el = m.target, name = m.attributeName, value = el.getAttribute(name) || "";
        if (el.tagName === "FORM" && name === "action") {
          report("form.action", abs(value), how());
        } else if (URL_ATTRS.has(name)) {
          report("attr." + name, el.tagName.toLowerCase() + " " + abs(value), how());
        } else {
          report("attr." + name, el.tagName.toLowerCase(), how());
        }
      }
    }
  }).observe(document, {childList: true, subtree: true, attributes: true,
                        attributeFilter: ["src", "href", "action", "formaction", "srcdoc", "onload", "onerror",
                                          "onclick", "onsubmit"]});
  addEventListener("pagehide", flush);
})();
"""


def find_chromium() -> str | None:
    """Debian's Chromium (or `SANDHOP_CHROMIUM`): never a browser downloaded at run time."""
    explicit = os.environ.get("SANDHOP_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


class BrowserGuard:
    """Decides and records what guarded Playwright contexts do (see the module docstring)."""

    def __init__(self, *, tracer=None, guard=None, engine: PolicyEngine | None = None,
                 config: SandboxConfig | None = None, proxy: "EgressProxy | None" = None) -> None:
        from sandhop.enforcement import tracer as tracing
        self.tracer = tracer if tracer is not None else tracing.active()
        self.guard = guard if guard is not None else getattr(getattr(self.tracer, "gate", None), "__self__", None)
        self.engine = engine or (self.guard.engine if self.guard is not None else None)
        self._config = config
        self.proxy = proxy

    @property
    def active(self) -> bool:
        return self.tracer is not None or self.engine is not None

    # ------------------------------------------------------------------ deciding
    def decide(self, category: str, op: str, target: str, detail: str, *, attribute: bool = True) -> Decision:
        """Record one event and decide it (allow when nothing guards this process).
        `attribute=False`: the browser's own traffic, not the test's: decided, but neither in the
        test's trace nor a violation of the test when refused (see `EgressProxy.refused`)."""
        cls = self.observe(category, op, target, detail) if attribute else ev.target_class(category, target, detail)
        if self.guard is not None:
            said = None
            if not self.guard.enforcing():
                d = _ALLOW
            elif attribute:  # the test's own request: the learned manager (if any) sees it first
                d, said = self.guard.decide_event(category, op, target, cls)
            else:
                d = self.guard.decide(category, target, cls)
            if d.effect != "allow":
                if attribute:
                    self.guard.record(category, op, target, detail, cls, d, said)
                if self.guard.mode == "audit":
                    d = _ALLOW  # audit mode records what would be denied and blocks nothing
            return d
        if self.engine is not None and self._config is not None:
            return self.engine.decide_target(category, target, cls, self._config)
        return _ALLOW

    def observe(self, category: str, op: str, target: str, detail: str) -> str:
        """Put an event in the test's trace (when recording); its target class."""
        cls = ev.target_class(category, target, detail)
        if self.tracer is not None:
            self.tracer.spool(category, op, target, detail, cls)
        return cls

    # ------------------------------------------------------------------ Playwright
    def attach(self, context) -> Any:
        """Route every request and WebSocket of `context` through the engine and observe its DOM."""
        context.route("**/*", self._on_route)
        context.route_web_socket(lambda url: True, self._on_websocket)
        context.expose_binding("__sandhop_dom", self._on_dom)
        context.add_init_script(DOM_OBSERVER)
        context._sandhop_guard = self
        return context

    def _on_route(self, route) -> None:
        request = route.request
        url = request.url
        if not url.startswith(("http:", "https:")) or request.resource_type == "websocket":
            # data:, blob:, about: never leave the browser; WebSockets are decided by _on_websocket
            return route.fallback()
        initiator = "navigation" if request.is_navigation_request() else _frame_url(request)
        detail = f"{request.resource_type} {initiator}".strip()
        d = self.decide("browser.request", request.method, url, detail)
        if d.effect == "deny":
            return route.abort("blockedbyclient")
        if d.effect == "redirect":
            return self._fulfil_stub(route, d)
        if self.proxy is not None:
            self.proxy.predecided(request.method, url)
        route.continue_()

    def _fulfil_stub(self, route, d: Decision) -> None:
        stub = Path(d.redirect_to).expanduser() if d.redirect_to else None
        if stub is not None and stub.is_file():
            return route.fulfill(path=stub)
        if route.request.resource_type == "document":
            return route.fulfill(status=200, content_type="text/html",
                                 body=f"<!doctype html><title>sandhop</title><p>redirected: {d.rule_id}</p>")
        route.fulfill(status=204, body=b"")

    def _on_websocket(self, ws) -> None:
        d = self.decide("browser.request", "WEBSOCKET", ws.url, "websocket")
        if d.effect == "allow":
            ws.connect_to_server()
        else:
            ws.close(code=1008, reason=f"sandhop: {d.rule_id}")

    def _on_dom(self, source, batch) -> None:
        page_url = ""
        try:
            page_url = source["frame"].url
        except Exception:  # noqa: BLE001 - a closed frame has no URL
            pass
        for item in batch if isinstance(batch, list) else ():
            try:
                op, target = str(item["op"])[:64], str(item["target"])[:2048]
                count, how = int(item.get("count", 1)), str(item.get("how", ""))[:16]
            except (KeyError, TypeError, ValueError):
                continue  # page script can call the binding too: ignore what is not a report
            detail = json.dumps({"count": count, "how": how, "page": page_url[:512]})
            cls = self.observe("dom.mutation", op, target, detail)
            if self.guard is not None and self.guard.manager is not None and self.guard.enforcing():
                # observe-only, but an event of the test's stream: the manager scores it and may act
                self.guard.decide_event("dom.mutation", op, target, cls)


_ALLOW = Decision("allow", "browser:unguarded", "no sandhop guard in this process")


def parse_host_rules(rules: str) -> list[tuple[str, str]]:
    """(host pattern, address) of the `MAP` entries of a Chromium `--host-resolver-rules` string."""
    out = []
    for rule in rules.split(","):
        words = rule.split()
        if len(words) == 3 and words[0].upper() == "MAP":
            out.append((words[1].lower(), words[2]))
    return out


def _frame_url(request) -> str:
    try:
        return request.frame.url
    except Exception:  # noqa: BLE001 - service-worker and detached requests have no frame
        return ""


# --------------------------------------------------------------------------- the egress proxy

class EgressProxy:
    """The browser's only way out (`--proxy-server`, loopback included): an HTTP proxy on
    127.0.0.1 in the test process. A request the routes decided (`predecided`) is forwarded; any
    other (a redirect hop, something that bypassed the routes) is decided here first, with the
    same guard, and refused when not allowed. HTTPS and WebSockets arrive as CONNECT host:port
    and are decided as `https://host:port/`. Host names follow `host_rules` (Chromium's
    `MAP name address` syntax), which Chromium cannot apply itself behind a proxy.

    The proxy is the guard's own machinery: its sockets are raw `_socket` ones, invisible to the
    audit hook, so they are not decided twice (as net.connect of the test)."""

    def __init__(self, guard: "BrowserGuard", host_rules: str = "") -> None:
        self.guard = guard
        self.host_map = parse_host_rules(host_rules)
        self._predecided: Counter = Counter()
        self._hops: Counter = Counter()   # redirect targets seen in responses the proxy relayed
        self.refused: list[str] = []       # the browser's own requests that were not allowed
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                _quiet()
                super().setup()

            def handle(self) -> None:
                proxy._handle(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        _quiet()
        try:
            self.server = Server(("127.0.0.1", 0), Handler)
        finally:
            _quiet(False)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        _quiet()
        self.server.serve_forever()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def predecided(self, method: str, url: str) -> None:
        """A request the routes decided: let it through once, undecided."""
        self._expect(self._predecided, method, url)

    def _expect(self, into: Counter, method: str, url: str) -> None:
        key = ("CONNECT", _authority(url)) if url.startswith("https:") else (method, url)
        with self._lock:
            into[key] += 1

    def _take(self, from_: Counter, key: tuple) -> bool:
        with self._lock:
            if from_[key] > 0:
                from_[key] -= 1
                return True
        return False

    def _decide(self, method: str, url: str, key: tuple) -> bool:
        """Whether a request may leave: one the routes decided passes; a redirect hop of one is
        decided as the test's request; anything else is the browser's own traffic, decided
        but never the test's violation."""
        if self._take(self._predecided, key):
            return True
        if self._take(self._hops, key):
            return self.guard.decide("browser.request", method, url, "redirect-hop").effect == "allow"
        allowed = self.guard.decide("browser.request", method, url, "browser-own", attribute=False).effect == "allow"
        if not allowed:
            with self._lock:
                self.refused.append(f"{method} {url}")
        return allowed

    def _resolve(self, host: str, port: int) -> tuple[str, int]:
        for pattern, address in self.host_map:
            if fnmatchcase(host.lower(), pattern):
                return address, port
        return host, port

    def _handle(self, client, rfile) -> None:
        head = rfile.readline(65537).decode("latin-1")
        parts = head.split()
        if len(parts) != 3:
            return
        method, target, version = parts
        headers = []
        while True:
            line = rfile.readline(65537).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            headers.append(line.rstrip("\r\n"))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            if not self._decide("CONNECT", f"https://{target}/", ("CONNECT", target)):
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = self._connect(host.strip("[]"), int(port or 443))
            if upstream is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            return _pipe(client, upstream, rfile)
        if not self._decide(method, target, (method, target)):
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n"
                           b"Connection: close\r\n\r\nsandhop: request denied\n")
            return
        u = urlsplit(target)
        upstream = self._connect(u.hostname or "", u.port or 80)
        if upstream is None:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        keep = [h for h in headers if h.split(":", 1)[0].lower() not in
                ("proxy-connection", "connection", "keep-alive")]
        request = f"{method} {path} {version}\r\n" + "".join(h + "\r\n" for h in keep) + "Connection: close\r\n\r\n"
        upstream.sendall(request.encode("latin-1"))
        length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
        if length:
            upstream.sendall(rfile.read(length))
        head = _response_head(upstream)
        status, location = _status_and_location(head)
        if status in (301, 302, 303, 307, 308) and location:
            # the browser will follow it without asking the routes: expect the hop here
            nxt = urljoin(target, location)
            self._expect(self._hops, "GET" if status == 303 or (status in (301, 302) and method == "POST")
                         else method, nxt)
        client.sendall(head)
        _pipe(client, upstream, None)

    def _connect(self, host: str, port: int):
        import _socket
        host, port = self._resolve(host, port)
        try:
            info = _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)[0]
            sock = _socket.socket(info[0], _socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(info[4])
            return sock
        except OSError:
            return None


def _quiet(on: bool = True) -> None:
    """Mark this thread as the guard's own: the tracer ignores its operations."""
    from sandhop.enforcement import tracer as tracing
    t = tracing.active()
    if t is not None:
        t._tls.busy = on


def _pipe(client, upstream, rfile) -> None:
    """Relay bytes both ways until either side closes."""
    import _socket
    sockets = [client, upstream]
    try:
        if rfile is not None and rfile.peek(1)[:1]:
            pending = rfile.read1(65536)
            if pending:
                upstream.sendall(pending)
        while True:
            ready, _, _ = select.select(sockets, [], [], 30)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (upstream if s is client else client).sendall(data)
    except (OSError, _socket.timeout):
        return
    finally:
        upstream.close()


def _response_head(sock) -> bytes:
    """The status line and headers of a response (and whatever body bytes came with them)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _status_and_location(head: bytes) -> tuple[int, str]:
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, ""
    location = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("location:")), "")
    return status, location


def _authority(url: str) -> str:
    u = urlsplit(url)
    host = u.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{u.port or (443 if u.scheme == 'https' else 80)}"


# --------------------------------------------------------------------------- new_context wrapper

_WRAPPED = False


def guard_new_contexts() -> None:
    """Attach a `BrowserGuard` to every context made by `Browser.new_context` / `new_page` (sync
    API) while a sandhop tracer or guard is active in this process."""
    global _WRAPPED
    if _WRAPPED:
        return
    from playwright.sync_api import Browser
    original = Browser.new_context

    def new_context(self, *args, **kwargs):
        kwargs.setdefault("service_workers", "block")
        context = original(self, *args, **kwargs)
        guard = BrowserGuard(proxy=getattr(self, "_sandhop_proxy", None))
        if guard.active:
            guard.attach(context)
        return context

    Browser.new_context = new_context
    _WRAPPED = True


# --------------------------------------------------------------------------- pytest fixtures

@pytest.fixture(scope="session")
def sandhop_host_rules() -> str:
    """Host mapping for the session's browser (e.g. `MAP api.shop.test 127.0.0.1`), applied by
    the egress proxy (behind a proxy Chromium resolves nothing itself)."""
    return ""


@pytest.fixture(scope="session")
def sandhop_browser(sandhop_host_rules):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install 'sandhop[browser]'")
    exe = find_chromium()
    if exe is None:
        pytest.skip("Chromium not found: install Debian's chromium (apt-get install chromium) or set "
                    "SANDHOP_CHROMIUM to its path")
    guard_new_contexts()
    proxy = EgressProxy(BrowserGuard(), sandhop_host_rules)
    args = [*CHROMIUM_ARGS, f"--proxy-server=http://{proxy.address}", "--proxy-bypass-list=<-loopback>"]
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=args)
        except Exception as exc:  # noqa: BLE001 - say why the browser could not start
            pytest.skip(f"Chromium at {exe} cannot start here: {str(exc).splitlines()[0]}")
        browser._sandhop_proxy = proxy
        yield browser
        browser.close()
    proxy.close()


@pytest.fixture
def sandhop_context(sandhop_browser):
    context = sandhop_browser.new_context(service_workers="block")
    if not hasattr(context, "_sandhop_guard"):
        BrowserGuard(proxy=sandhop_browser._sandhop_proxy).attach(context)  # nothing sandhop active: decisions allow, DOM still observed
    yield context
    context.close()


@pytest.fixture
def sandhop_page(sandhop_context):
    return sandhop_context.new_page()
