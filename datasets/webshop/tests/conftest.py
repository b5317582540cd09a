"""The shop's browser tests: Playwright pages from sandhop's fixtures (Debian's Chromium), the
shop served on loopback, its API host mapped to loopback by Chromium's resolver rules."""

import pytest

from sandhop.datasets.webshop.app import API_HOST, make_server


@pytest.fixture(scope="session")
def shop():
    server = make_server()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def sandhop_host_rules():
    return f"MAP {API_HOST} 127.0.0.1"


@pytest.fixture
def base(shop):
    return f"http://127.0.0.1:{shop.server_address[1]}"


@pytest.fixture
def page(sandhop_page):
    return sandhop_page
