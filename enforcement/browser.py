"""Browser tests under the one `PolicyEngine`: Playwright (Chromium) requests and DOM changes.

Every request a guarded browser context makes becomes a `browser.request` event (target: the
URL; op: the method; detail: resource type and initiator) decided by the engine with the running
test's config: allowed requests go out, denied ones are aborted, redirected ones are fulfilled
from a local stub. What is covered:

- `context.route`, so every page of the context (popups' first requests included) is covered;
- every hop of a redirect chain: the guard fetches the chain itself one hop at a time
  (`max_redirects=0`) and decides each hop before it is requested, then fulfils the request with
  the final response (so a redirected navigation keeps its first URL as the page URL);
- WebSockets (`context.route_web_socket`): the handshake URL is decided; denied sockets close;
- service workers are blocked (`service_workers="block"` on every context the fixtures make),
  so no request escapes the context's routes through a worker.

DOM changes are **observed only**: an init script's MutationObserver reports added external
scripts, inline scripts, iframes and forms, form-action changes and changed URL or handler
attributes (src, href, action, formaction, srcdoc, on*) through an exposed binding, summarised
(one event per distinct change per 50 ms batch, with a count) so a busy page cannot flood the
trace. They become `dom.mutation` events in the trace; nothing is blocked on their account (the
requests they lead to are decided like any other).

Events go through the process's tracer (`--sandhop-record`: the same trace as the test's Python
events, attributed to the test and phase) and decisions through its guard (`--sandhop-policy`:
denials fail the test out of band and reach the audit log). Without either, a context runs under
`engine`/`config` if given, else unguarded.

Pytest fixtures (this module is a pytest plugin): `sandhop_browser` (Debian's Chromium, launched
once per session with a fresh profile and background networking disabled), `sandhop_context`
and `sandhop_page` (guarded, per test). Override `sandhop_host_rules` (a Chromium
`--host-resolver-rules` string) to map test host names to loopback. Playwright contexts made
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
from fnmatch import fnmatchcase
from urllib.parse import urljoin, urlsplit, urlunsplit

import pytest

from sandhop.enforcement import events as ev
from sandhop.enforcement.engine import Decision, PolicyEngine, SandboxConfig

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ("--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--no-first-run", "--no-default-browser-check",
                 "--disable-client-side-phishing-detection", "--disable-domain-reliability",
                 "--metrics-recording-only",
                 # Local Network Access checks would refuse a fulfilled page's loopback connections (it
                 # has no address space); the engine decides every request instead.
                 "--disable-features=OptimizationHints,MediaRouter,Translate,LocalNetworkAccessChecks,"
                 "BlockInsecurePrivateNetworkRequests")
MAX_HOPS = 20
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})

DOM_OBSERVER = r"""
(() => {
  if (window.__sandhopObserving) return;
  window.__sandhopObserving = true;
  const send = window.__sandhop_dom;
  const pending = new Map();
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
    if (pending.size >= 200) { flush(); } else if (timer === null) { timer = setTimeout(flush, 50); }
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
                 config: SandboxConfig | None = None, host_rules: str = "") -> None:
        from sandhop.enforcement import tracer as tracing
        self.tracer = tracer if tracer is not None else tracing.active()
        self.guard = guard if guard is not None else getattr(getattr(self.tracer, "gate", None), "__self__", None)
        self.engine = engine or (self.guard.engine if self.guard is not None else None)
        self._config = config
        self.host_map = parse_host_rules(host_rules)
        self.decisions: list[dict] = []   # (category, target, effect) of this guard's contexts, in order
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.tracer is not None or self.engine is not None

    @property
    def config(self) -> SandboxConfig | None:
        if self.guard is not None:
            return self.guard.config
        return self._config

    # ------------------------------------------------------------------ deciding
    def decide(self, category: str, op: str, target: str, detail: str) -> Decision:
        """Record one event and decide it (allow when nothing guards this process)."""
        cls = ev.target_class(category, target, detail)
        if self.tracer is not None and self.tracer.spool_dir:
            self.tracer.spool(category, op, target, detail, cls)
        if self.guard is not None:
            d = self.guard.decide(category, target, cls) if self.guard.enforcing() else _ALLOW
            if d.effect != "allow":
                self.guard.record(category, op, target, detail, cls, d)
                if self.guard.mode == "audit":
                    d = _ALLOW
        elif self.engine is not None and self._config is not None:
            d = self.engine.decide_target(category, target, cls, self._config)
        else:
            d = _ALLOW
        with self._lock:
            self.decisions.append({"category": category, "op": op, "target": target, "detail": detail,
                                   "effect": d.effect, "rule": d.rule_id})
        return d

    def observe(self, category: str, op: str, target: str, detail: str) -> None:
        cls = ev.target_class(category, target, detail)
        if self.tracer is not None and self.tracer.spool_dir:
            self.tracer.spool(category, op, target, detail, cls)
        with self._lock:
            self.decisions.append({"category": category, "op": op, "target": target, "detail": detail,
                                   "effect": "observed", "rule": ""})

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
        self._follow(route, url, request.method)

    def _follow(self, route, url: str, method: str) -> None:
        """Fetch the request one hop at a time, deciding each redirect's target before it is
        requested; fulfil with the final response."""
        post = route.request.post_data_buffer
        for _ in range(MAX_HOPS):
            target, headers = self._mapped(url, route.request.headers)
            try:
                response = route.fetch(url=target, method=method, post_data=post, headers=headers, max_redirects=0)
            except Exception:  # noqa: BLE001 - a failed fetch is a failed request, as without routing
                return route.abort("failed")
            location = response.headers.get("location")
            if response.status not in _REDIRECT_STATUS or not location:
                return route.fulfill(response=response)
            nxt = urljoin(url, location)
            if not nxt.startswith(("http:", "https:")):
                return route.fulfill(response=response)
            d = self.decide("browser.request", "GET" if response.status == 303 else method, nxt,
                            f"{route.request.resource_type} redirect-from {url}")
            if d.effect == "deny":
                return route.abort("blockedbyclient")
            if d.effect == "redirect":
                return self._fulfil_stub(route, d)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, post = "GET", None
            url = nxt
        route.abort("failed")  # too many redirects

    def _mapped(self, url: str, headers: dict) -> tuple[str, dict]:
        """The guard fetches from outside the browser: apply the browser's host-resolver MAP
        rules itself (http only; the Host header keeps the name)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        for pattern, ip in self.host_map:
            if parts.scheme == "http" and fnmatchcase(host, pattern):
                netloc = ip + (f":{parts.port}" if parts.port else "")
                return urlunsplit(parts._replace(netloc=netloc)), {**headers, "host": parts.netloc}
        return url, headers

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
            self.observe("dom.mutation", op, target, json.dumps({"count": count, "how": how, "page": page_url[:512]}))


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
        guard = BrowserGuard(host_rules=getattr(self, "_sandhop_host_rules", ""))
        if guard.active:
            guard.attach(context)
        return context

    Browser.new_context = new_context
    _WRAPPED = True


# --------------------------------------------------------------------------- pytest fixtures

@pytest.fixture(scope="session")
def sandhop_host_rules() -> str:
    """Chromium `--host-resolver-rules` for the session (e.g. `MAP api.shop.test 127.0.0.1`)."""
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
    args = list(CHROMIUM_ARGS) + ([f"--host-resolver-rules={sandhop_host_rules}"] if sandhop_host_rules else [])
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=args)
        except Exception as exc:  # noqa: BLE001 - say why the browser could not start
            pytest.skip(f"Chromium at {exe} cannot start here: {str(exc).splitlines()[0]}")
        browser._sandhop_host_rules = sandhop_host_rules
        yield browser
        browser.close()


@pytest.fixture
def sandhop_context(sandhop_browser):
    context = sandhop_browser.new_context(service_workers="block")
    if not hasattr(context, "_sandhop_guard"):
        BrowserGuard(host_rules=sandhop_browser._sandhop_host_rules).attach(context)  # nothing sandhop active: decisions allow, DOM still observed
    yield context
    context.close()


@pytest.fixture
def sandhop_page(sandhop_context):
    return sandhop_context.new_page()
