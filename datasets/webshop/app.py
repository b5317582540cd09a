"""The web shop: pages on 127.0.0.1, a JSON API that answers as `api.shop.test` (map it to
loopback with Chromium's `--host-resolver-rules=MAP api.shop.test 127.0.0.1`), standard library
only. A session cookie after login; the account page keeps an API token in localStorage, as
single-page apps do (which is what a malicious script in the page goes after).

`extra_script`: a script added to every page (the live probes use it to stand in for a
compromised third-party script).
"""

from __future__ import annotations

import html
import http.server
import json
import secrets
import threading
from urllib.parse import parse_qs, urlsplit

API_HOST = "api.shop.test"
USERS = {"alice": "wonderland", "bob": "builder"}
PRODUCTS = [
    {"id": 1, "name": "Teapot", "price": 24.0, "tags": ["kitchen"]},
    {"id": 2, "name": "Kettle", "price": 39.5, "tags": ["kitchen"]},
    {"id": 3, "name": "Notebook", "price": 4.2, "tags": ["office"]},
    {"id": 4, "name": "Fountain pen", "price": 18.0, "tags": ["office"]},
    {"id": 5, "name": "Umbrella", "price": 12.9, "tags": ["outdoor"]},
]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title} - shop</title>
<script>window.API = "http://{api}:{port}";</script>
<script src="/static/app.js"></script>{extra}
</head><body><nav><a href="/">home</a> <a href="/cart">cart</a> <a href="/login">login</a>
<a href="/contact">contact</a></nav><main>{body}</main></body></html>"""

APP_JS = """
window.shop = {
  async products(query) {
    const r = await fetch(API + "/products" + (query ? "?q=" + encodeURIComponent(query) : ""));
    return r.json();
  },
  async add(id) {
    const r = await fetch(API + "/cart", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({id: id, session: localStorage.getItem("token")})});
    const cart = await r.json();
    document.getElementById("count").textContent = String(cart.items.length);
    return cart;
  },
  async render(query) {
    const list = document.getElementById("products");
    list.innerHTML = "";
    for (const p of await shop.products(query)) {
      const li = document.createElement("li");
      li.textContent = p.name + " " + p.price.toFixed(2);
      li.dataset.id = p.id;
      list.appendChild(li);
    }
    return list.children.length;
  },
};
"""

# path -> (title, body) of the pages that are the same for everyone
PAGES = {
    "/": ("home", "<h1>Shop</h1><input id=q placeholder=search><ul id=products></ul><script>shop.render()</script>"),
    "/login": ("login", "<h1>Log in</h1><form id=login method=post action=/login><input name=user>"
                        "<input name=password type=password><button id=submit>log in</button></form>"),
    "/cart": ("cart", "<h1>Cart</h1><p>items: <span id=count>0</span></p><ul id=products></ul>"
                      "<script>shop.render()</script>"),
    "/contact": ("contact", "<h1>Contact</h1><form id=contact method=post action=/contact><input name=email>"
                            "<textarea name=message></textarea><button id=send>send</button></form>"),
}


def make_server(host: str = "127.0.0.1", port: int = 0, *, extra_script: str = "") -> http.server.ThreadingHTTPServer:
    """A started shop server (serving in a daemon thread); `.shutdown()` stops it."""
    server = _Server((host, port), _Handler)
    server.extra_script = extra_script
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    extra_script = ""

    def __init__(self, *args):
        super().__init__(*args)
        self.sessions: dict[str, str] = {}   # token -> user
        self.carts: dict[str, list[int]] = {}
        self.messages: list[dict] = []


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: str | bytes, kind: str = "text/html; charset=utf-8",
              headers: dict | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _page(self, title: str, body: str, status: int = 200, headers: dict | None = None) -> None:
        port = self.server.server_address[1]
        extra = f"\n<script>{self.server.extra_script}</script>" if self.server.extra_script else ""
        self._send(status, PAGE.format(title=html.escape(title), api=API_HOST, port=port, extra=extra, body=body),
                   headers=headers)

    def _form(self) -> dict[str, str]:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        return {k: v[0] for k, v in parse_qs(raw).items()}

    def _user(self) -> str | None:
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "session":
                return self.server.sessions.get(value)
        return None

    def _api(self) -> bool:
        return self.headers.get("Host", "").split(":")[0] == API_HOST

    def _cors(self) -> dict:
        return {"Access-Control-Allow-Origin": self.headers.get("Origin", "*"),
                "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Allow-Methods": "GET, POST"}

    # ------------------------------------------------------------------ routes
    def do_OPTIONS(self) -> None:
        self._send(204, b"", headers=self._cors())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if self._api():
            if url.path == "/products":
                q = parse_qs(url.query).get("q", [""])[0].lower()
                items = [p for p in PRODUCTS if q in p["name"].lower() or any(q in t for t in p["tags"])]
                return self._send(200, json.dumps(items), "application/json", self._cors())
            return self._send(404, json.dumps({"error": "no such endpoint"}), "application/json", self._cors())
        if url.path == "/static/app.js":
            return self._send(200, APP_JS, "text/javascript")
        if url.path in PAGES:
            return self._page(*PAGES[url.path])
        if url.path == "/account":
            user = self._user()
            if user is None:
                return self._send(302, b"", headers={"Location": "/login"})
            token = next(t for t, u in self.server.sessions.items() if u == user)
            return self._page("account", f"<h1 id=welcome>Welcome {html.escape(user)}</h1>"
                                         f"<script>localStorage.setItem('token', {json.dumps(token)})</script>")
        self._page("not found", "<h1>not found</h1>", status=404)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if self._api():
            if url.path == "/cart":
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                cart = self.server.carts.setdefault(str(body.get("session")), [])
                cart.append(int(body.get("id", 0)))
                return self._send(200, json.dumps({"items": cart}), "application/json", self._cors())
            return self._send(404, json.dumps({"error": "no such endpoint"}), "application/json", self._cors())
        form = self._form()
        if url.path == "/login":
            user = form.get("user", "")
            if USERS.get(user) != form.get("password"):
                return self._page("login", "<p id=error>wrong user or password</p>", status=403)
            token = secrets.token_hex(16)
            self.server.sessions[token] = user
            return self._send(302, b"", headers={"Location": "/account",
                                                 "Set-Cookie": f"session={token}; Path=/; HttpOnly"})
        if url.path == "/contact":
            self.server.messages.append(form)
            return self._page("thanks", "<p id=thanks>Thank you, we will write back.</p>")
        self._page("not found", "<h1>not found</h1>", status=404)
