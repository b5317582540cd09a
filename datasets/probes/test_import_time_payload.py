"""Probe of import-time-payload: this module imports a typosquat of `requests` (it lives only in
the harness's fake site-packages), whose __init__ sends the environment to the attacker while
pytest collects this module. The test then checks what the attacker got."""

import json
import socket

# Never import the typosquat where an attacker name could reach a real host.
if sorted(name for _index, name in socket.if_nameindex()) != ["lo"]:
    raise RuntimeError("sandhop probe: refusing to import a payload outside the probe harness's namespace")

import reqeusts  # noqa: E402  (the typo is the attack)


def test_import_time_payload(loot):
    env = json.loads(loot.stored(reqeusts.STORED))
    assert env["AWS_SECRET_ACCESS_KEY"] == "CANARY-AWS_SECRET_ACCESS_KEY"
