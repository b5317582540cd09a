"""The attack scenario library: what malicious dependencies do inside a test run, as events.

A scenario is a short, ordered list of `Step`s, each one operation as the recorder would store it
(category, op, a target template, detail), with the behaviour tags it shows and a mark on the
step that does the damage. Hard negatives are scenarios too (`malicious=False`): benign tests
that look like attacks to a naive rule (a config file in HOME, a loopback server, a git child).

Each scenario has two forms:
- `generate(scenario, rng)`: its events with variation (which secret, which host, IP spelling,
  ports, file names, the phase it fires in, timing), used by `sandhop inject`;
- a live probe, a test in `datasets/probes/` (`sandhop.datasets.probe.PROBES` maps each scenario
  to its node ids), that really performs it against canaries in a fake HOME and listeners inside
  a private network namespace (`python -m sandhop.datasets.probe`). `tests/test_probes.py`
  checks that the two agree on categories, ops, target classes and order.

Templates name variables in braces, drawn once per generated attack from `POOLS` so that one
attack is self-consistent (the host it resolves is the host it connects to); a variable named
`hex` or `label` is drawn afresh each time it appears (DNS tunnel chunks).
"""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass
from typing import Iterable, Sequence

from sandhop.enforcement.events import (
    CATEGORIES, INFERRED_TAGS, PHASES, Event, format_address, observed_tags, target_class,
)


class ScenarioError(ValueError):
    """An unknown scenario id or family, or a bad scenario selection."""


@dataclass(frozen=True)
class Step:
    category: str
    op: str
    target: str                    # template: {variables} from POOLS, ${...} portable roots
    detail: str = ""
    tags: tuple[str, ...] = ()     # inferred behaviour tags this step shows
    damaging: bool = False         # the step that does the harm (data leaves, code runs, persists)
    child: int = 0                 # 0: the test's own process; k: its k-th child process
    repeat: tuple[int, int] = (1, 1)  # drawn count of this step (DNS chunks)
    cls: str = ""                  # target class where the recorder's differs from target_class()


@dataclass(frozen=True)
class Scenario:
    id: str
    family: str
    description: str
    source: str
    steps: tuple[Step, ...]
    malicious: bool = True
    phases: tuple[str, ...] = ("call",)  # where it may fire; the first is the usual one
    slow: bool = False                   # steps spread across the host test's benign work
    unordered: tuple[tuple[int, ...], ...] = ()  # runs of consecutive steps done in any order
    browser: bool = False                # happens in a web page: injected only into browser tests

    @property
    def tags(self) -> tuple[str, ...]:
        """Inferred behaviour tags of the whole scenario, in vocabulary order."""
        seen = {t for s in self.steps for t in s.tags}
        return tuple(t for t in INFERRED_TAGS if t in seen)

    @property
    def damaging_step(self) -> int | None:
        """Index of the step that does the damage (None for a hard negative)."""
        return next((i for i, s in enumerate(self.steps) if s.damaging), None)


# --------------------------------------------------------------------------- variation pools

PY = "${python}/bin/python3.11"
POOLS: dict[str, tuple[str, ...]] = {
    "secret_env": ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "GITHUB_TOKEN", "NPM_TOKEN",
                   "PYPI_API_TOKEN", "OPENAI_API_KEY", "SLACK_BOT_TOKEN", "DATABASE_URL",
                   "STRIPE_SECRET_KEY", "CI_JOB_TOKEN"),
    "secret_env2": ("GH_TOKEN", "AZURE_CLIENT_SECRET", "DOCKER_PASSWORD", "TWINE_PASSWORD",
                    "HF_TOKEN", "SENTRY_AUTH_TOKEN"),
    "ssh_key": ("id_rsa", "id_ed25519", "id_ecdsa"),
    "cloud_cred": ("${home}/.aws/credentials", "${home}/.config/gcloud/application_default_credentials.json",
                   "${home}/.azure/accessTokens.json", "${home}/.kube/config", "${home}/.docker/config.json"),
    "token_file": ("${home}/.netrc", "${home}/.pypirc", "${home}/.git-credentials", "${home}/.npmrc",
                   "${home}/.config/gh/hosts.yml", "${home}/.vault-token"),
    "profile": ("${home}/.bashrc", "${home}/.profile", "${home}/.bash_profile", "${home}/.zshrc"),
    "attacker_domain": ("telemetry-sync.xyz", "cdn-update-check.top", "api.pkg-stats.io",
                        "static.fontcdn-edge.net", "metrics.devtools-cloud.com", "a7f3.requestcatcher.cc"),
    "oast_domain": ("oast.fun", "oast.pro", "oast.live", "interact.sh", "burpcollaborator.net"),
    "attacker_ip": ("45.155.205.233", "185.244.25.14", "91.92.243.18", "193.42.33.7",
                    "2a0e:97c0:3e3:2f::1", "104.21.53.82"),
    "saas": ("discord.com", "hooks.slack.com", "api.telegram.org", "api.github.com",
             "pastebin.com", "webhook.site"),
    "saas_ip": ("162.159.135.232", "54.192.18.101", "149.154.167.220", "140.82.112.6",
                "104.20.67.143", "46.4.105.116"),
    "pool_domain": ("pool.supportxmr.com", "xmr.2miners.com", "gulf.moneroocean.stream"),
    "exfil_port": ("443", "80", "8080", "4444", "1337", "9001"),
    "shell_port": ("4444", "1337", "9001", "31337", "8443"),
    "web_port": ("443", "80", "8080"),
    "tmpdir": ("${tmp}/pytest-of-root/pytest-{n}/test_{word}0", "${tmp}/tmp{word}",
               "${tmp}/pytest-of-runner/pytest-{n}/test_{word}1"),
    "payload": (".cache-update", "kworker", "systemd-helper", ".x11-unix-sync", "update.sh"),
    "miner": ("xmrig", "kdevtmpfsi", "sysupdate", "xmr-stak"),
    "pth": ("distutils-precedence2", "_virtualenv_sync", "easy-install-ext", "zzz_init"),
    "pkg": ("reqeusts", "colourama", "dateutils2", "jeIlyfish", "urllib4", "setuptools_ext"),  # importable names
    "innocent": ("fixture.txt", "data.json", "expected_output.txt", "sample.cfg"),
    # stored as the real path: /bin/sh is dash on Debian-family systems
    "shell": ("/usr/bin/sh -i", "/usr/bin/bash -i", "/usr/bin/dash -i", "/usr/bin/dash"),
    "recon_tool": ("/usr/bin/whoami", "/usr/bin/uname -a", "/usr/bin/id", "/usr/bin/hostname"),
    "native_sym": ("system", "execve", "syscall", "popen"),
    "libc": ("<self>", "libc.so.6"),
    "app": ("myapp", "toolkit", "ruff", "pip", "black", "mypy"),
    "test_token": ("API_TOKEN", "TEST_PASSWORD", "FAKE_SECRET_KEY", "GITHUB_TOKEN"),
    "loop_host": ("127.0.0.1", "::1", "localhost"),
    # error-path tests of HTTP clients: names that never resolve, non-routable addresses that time out
    "bad_host": ("{word}.invalid", "no-such-host-{word}", "doesnotexist.{word}-test.org", "nonexistent.{word}.test",
                 "unresolvable-{word}.net"),
    "tarpit": ("10.255.255.1", "10.255.255.254", "192.168.255.254"),
    "word": ("alpha", "cache", "data", "load", "parse", "roundtrip", "upload", "config"),
    "n": tuple(str(i) for i in range(3, 400, 7)),
    "pid": tuple(str(i) for i in range(1100, 98000, 977)),
    "port": tuple(str(p) for p in range(33001, 60999, 1373)),
    "discord_store": ("${home}/.config/discord/Local Storage/leveldb/000005.ldb",
                      "${home}/.config/google-chrome/Default/Login Data",
                      "${home}/.mozilla/firefox/profile.default/cookies.sqlite"),
    "pickle_file": ("model.pkl", "weights.pt", "cache.pickle", "fixtures.joblib"),
    # browser: a compromised third-party script in the page under test, and where it sends things
    "js_path": ("/static/lib.js", "/cdn/analytics.min.js", "/js/jquery-3.7.1.min.js", "/assets/tag.js"),
    "collect_path": ("/collect", "/c", "/api/v2/events", "/log", "/pixel"),
    "page": ("http://127.0.0.1:{port}/", "http://127.0.0.1:{port}/account", "http://127.0.0.1:{port}/login",
             "http://localhost:{port}/checkout"),
}
_ROOTS = frozenset({"tmp", "home", "cwd", "site", "stdlib", "python"})


def _spell_ip(ip: str, rng: random.Random) -> str:
    """One of the spellings C's resolver accepts for the same address; the stored target is the
    canonical form, so this varies the input the normalisation sees, not the label space."""
    if ":" in ip:
        return rng.choice((ip, ip.upper(), f"[{ip}]"))
    a, b, c, d = (int(x) for x in ip.split("."))
    n = (a << 24) | (b << 16) | (c << 8) | d
    return rng.choice((ip, str(n), hex(n), f"0{a:o}.{b}.{c}.{d}", f"{a}.{b}.{(c << 8) | d}",
                       f"::ffff:{ip}"))


class _Draw:
    """Variables of one generated attack: each drawn once, then reused (consistent story)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.values = rng, {}

    def __getitem__(self, name: str) -> str:
        if name in _ROOTS:  # `${home}` in a template is a portable root, kept as written
            return "{" + name + "}"
        if name == "hex":
            return "".join(self.rng.choice("0123456789abcdef") for _ in range(self.rng.choice((16, 24, 30, 48))))
        if name == "label":
            return "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        if name not in self.values:
            if name not in POOLS:
                raise KeyError(f"template variable {{{name}}} has no pool in POOLS")
            value = self.rng.choice(POOLS[name])
            self.values[name] = value.format_map(self) if "{" in value else value
        return self.values[name]


# --------------------------------------------------------------------------- steps, briefly

C, L = "credential_access", "exfiltration"
PERSIST, RECON, EXEC, EVADE, ABUSE, TAMPER = ("persistence", "reconnaissance", "execution",
                                             "defense_evasion", "resource_abuse", "tampering")


def env_read(name: str, tags=(C,), **kw) -> Step:
    return Step("env.read", "environ.get", name, tags=tags, **kw)


def env_dump(tags=(C,), **kw) -> Step:
    return Step("env.read", "environ.copy", "*", tags=tags, **kw)


def read(path: str, tags=(C,), **kw) -> Step:
    return Step("fs.read", "open", path, "r", tags=tags, **kw)


def write(path: str, mode: str = "w", tags=(), **kw) -> Step:
    return Step("fs.write", "open", path, mode, tags=tags, **kw)


def dns(host: str, tags=(), **kw) -> Step:
    return Step("net.dns", "socket.getaddrinfo", host, tags=tags, **kw)


def connect(address: str, tags=(L,), damaging=True, **kw) -> Step:
    return Step("net.connect", "socket.connect", address, "tcp", tags=tags, damaging=damaging, **kw)


def spawn(argv: str, tags=(EXEC,), **kw) -> Step:
    return Step("proc.spawn", "subprocess.Popen", argv, tags=tags, **kw)


def browser(method: str, url: str, detail: str, tags=(), **kw) -> Step:
    return Step("browser.request", method, url, detail, tags=tags, **kw)


def dom(op: str, target: str, tags=(), **kw) -> Step:
    return Step("dom.mutation", op, target, '{{"count": 1, "how": "script", "page": "{page}"}}', tags=tags, **kw)


def http_post(host_var: str, ip_var: str, port_var: str = "web_port", tags=(L,), **kw) -> tuple[Step, Step]:
    """Resolve a name, then connect to the address it resolved to (urllib/requests/http.client)."""
    return (dns("{%s}" % host_var, tags=tags, **kw),
            connect("{%s}:{%s}" % (ip_var, port_var), tags=tags, **kw))


# --------------------------------------------------------------------------- the library

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "env-secret-tcp", "env-exfil",
        "Reads credential environment variables and sends them over a raw TCP socket to an IP.",
        "MAL-2026-6949 (npm vps-adapter-core: credentials sent over raw TCP); req-tools/reols (PyPI, 2020: raw socket with host facts, pypi/warehouse#7195); ATT&CK T1552, T1095",
        (env_read("{secret_env}"), env_read("{secret_env2}"),
         connect("{attacker_ip}:{exfil_port}")),
        unordered=((0, 1),),
    ),
    Scenario(
        "ssh-key-http-post", "credential-file-exfil",
        "Reads an SSH private key and POSTs it over HTTP to an attacker domain.",
        "jeIlyfish / python3-dateutil (PyPI, Dec 2019: SSH and GPG keys stolen); MAL-2026-2144 (litellm 1.82.7/8 posts ~/.ssh keys); ATT&CK T1552.004, T1041",
        (read("${home}/.ssh/{ssh_key}"), *http_post("attacker_domain", "attacker_ip")),
    ),
    Scenario(
        "cloud-creds-http-post", "credential-file-exfil",
        "Reads cloud credentials (AWS, gcloud, Azure, kube, docker) and POSTs them over HTTP.",
        "MAL-2026-2144 (litellm 1.82.7/1.82.8: cloud and kube credentials exfiltrated over HTTPS); ATT&CK T1552.001, T1041",
        (read("{cloud_cred}"), read("{token_file}"), *http_post("attacker_domain", "attacker_ip")),
        unordered=((0, 1),),
    ),
    Scenario(
        "dns-tunnel", "dns-exfil",
        "Encodes a stolen secret in DNS query labels under an attacker-controlled zone.",
        "torchtriton dependency confusion (Dec 2022) and dependency-confusion PoCs that hex-encode host data into DNS labels (pypi/warehouse#9894); ATT&CK T1071.004, T1048, T1132",
        (env_read("{secret_env}"),
         dns("{hex}.{label}.{attacker_domain}", tags=(L,), damaging=True),
         dns("{hex}.{label}.{attacker_domain}", tags=(L,), repeat=(1, 4))),
    ),
    Scenario(
        "saas-exfil", "saas-exfil",
        "Dumps the environment and posts it to an allow-listed SaaS endpoint (webhook, bot API, gist).",
        "MAL-2024-11518 (aiocpa: secrets to a Telegram bot); MAL-2026-15827 (company-sdk: to a GitHub Gist on import); ATT&CK T1567",
        (env_dump(), *http_post("saas", "saas_ip", "web_port")),
    ),
    Scenario(
        "bashrc-persistence", "persistence",
        "Appends a command to a shell start-up file so it runs at every login.",
        "technique, no confirmed package case: shell start-up file persistence; ATT&CK T1546.004",
        (read("{profile}", tags=(PERSIST,)),
         write("{profile}", "a", tags=(PERSIST,), damaging=True)),
    ),
    Scenario(
        "pth-persistence", "persistence",
        "Drops a .pth file into site-packages, so its code runs at every interpreter start.",
        "MAL-2026-5324 (pyphetools: a .pth that runs at every interpreter start); litellm 1.82.8 litellm_init.pth; ATT&CK T1546.018",
        (Step("fs.meta", "os.listdir", "${site}", tags=(RECON,)),
         write("${site}/{pth}.pth", "w", tags=(PERSIST,), damaging=True)),
    ),
    Scenario(
        "authorized-keys-backdoor", "persistence",
        "Appends the attacker's public key to ~/.ssh/authorized_keys.",
        "MAL-2026-6949 (npm vps-adapter-core appends an attacker key to ~/.ssh/authorized_keys); ATT&CK T1098.004",
        (write("${home}/.ssh/authorized_keys", "a", tags=(PERSIST,), damaging=True),),
    ),
    Scenario(
        "reverse-shell", "remote-control",
        "Connects back to the attacker and hands a shell the socket as its stdin and stdout.",
        "MAL-2026-15566 (flask-header-guard: reverse shell on install); giganigga (PyPI 2021: connect, dup2, spawn /bin/sh, pypi/warehouse#9887); ATT&CK T1059.004, T1095",
        (connect("{attacker_ip}:{shell_port}", tags=(EXEC,), damaging=False),
         spawn("{shell}", tags=(EXEC,), damaging=True)),
    ),
    Scenario(
        "dropper", "dropper",
        "Downloads a second stage, marks it executable and runs it.",
        "MAL-2026-15933 (houdus: downloads and runs a second stage); request (PyPI: setup.py fetches and runs a trojan); ATT&CK T1105",
        (dns("{attacker_domain}", tags=(EXEC,)),
         connect("{attacker_ip}:{web_port}", tags=(EXEC,), damaging=False),
         write("{tmpdir}/{payload}", "w", tags=(EXEC,)),
         Step("fs.meta", "os.chmod", "{tmpdir}/{payload}", "0o755", tags=(EXEC,)),
         spawn("{tmpdir}/{payload}", tags=(EXEC,), damaging=True)),
    ),
    Scenario(
        "cryptominer", "resource-abuse",
        "Writes a miner to a hidden cache folder and starts it against a mining pool.",
        "MAL-2024-5012 (culturestreak: stealthy crypto mining); ultralytics 8.3.41 (Dec 2024: XMRig); ATT&CK T1496",
        (write("${home}/.cache/.{miner}/{miner}", "w", tags=(ABUSE,)),
         Step("fs.meta", "os.chmod", "${home}/.cache/.{miner}/{miner}", "0o755", tags=(ABUSE,)),
         spawn("${home}/.cache/.{miner}/{miner} -o {pool_domain}:443 --donate-level 1 --background",
               tags=(ABUSE, EXEC), damaging=True)),
    ),
    Scenario(
        "import-time-payload", "supply-chain-hook",
        "A typosquatted package runs its payload in __init__ when the test module imports it.",
        "MAL-2026-3201 (lightning 2.6.2/2.6.3: payload starts when the module is imported); ctx 0.2.2 (2022); ATT&CK T1195.002",
        (Step("code.import", "import", "{pkg}", tags=(EXEC,)),
         env_dump(), *http_post("attacker_domain", "attacker_ip")),
        phases=("collect", "setup"),
    ),
    Scenario(
        "collection-time-payload", "supply-chain-hook",
        "A conftest.py or pytest plugin steals a token file while the suite is being collected.",
        "technique, no confirmed package case: payload in a conftest.py or pytest plugin at collection; ATT&CK T1195.002",
        (read("{token_file}"), *http_post("attacker_domain", "attacker_ip")),
        phases=("collect",),
    ),
    Scenario(
        "child-python-laundering", "laundering",
        "Spawns a child interpreter to do the theft, so the parent's own actions look clean.",
        "litellm 1.82.8 (MAL-2026-2144): its .pth starts `sys.executable -c` with the payload; ATT&CK T1059.006",
        (spawn(f"{PY} -c 'import os,socket;...'", tags=(EXEC, EVADE)),
         Step("code.exec", "compile", "<string>", child=1, tags=(EXEC,)),
         read("{cloud_cred}", child=1),
         connect("{attacker_ip}:{exfil_port}", child=1)),
    ),
    Scenario(
        "symlink-secret", "evasion",
        "Links an innocent-looking file in tmp to a private key, reads the link, sends the key.",
        "technique, no confirmed package case: reading a secret through a symlink under an innocent name; ATT&CK T1552.001",
        (Step("fs.write", "os.symlink", "{tmpdir}/{innocent}", "-> ${home}/.ssh/{ssh_key}", tags=(EVADE,)),
         read("${home}/.ssh/{ssh_key}"),
         connect("{attacker_ip}:{exfil_port}")),
    ),
    Scenario(
        "proc-environ", "env-exfil",
        "Reads the process environment through /proc/self/environ and sends it in a UDP datagram.",
        "technique: environment theft through /proc (tj-actions/changed-files, Mar 2025, read runner memory via /proc); ATT&CK T1003.007",
        (Step("fs.read", "open", "/proc/{pid}/environ", "r", tags=(C,)),
         Step("net.send", "socket.sendto", "{attacker_ip}:53", "udp", tags=(L,), damaging=True)),
    ),
    Scenario(
        "cloud-metadata", "cloud-metadata",
        "Asks the cloud instance metadata service for role credentials and sends them out.",
        "MAL-2026-3201 (lightning: credentials from cloud metadata endpoints); ATT&CK T1552.005",
        (connect("169.254.169.254:80", tags=(C,), damaging=False),
         *http_post("attacker_domain", "attacker_ip")),
    ),
    Scenario(
        "ctypes-native", "native-escape",
        "Loads libc through ctypes and calls system() directly, below every Python audit hook.",
        "MAL-2026-15933 (houdus: native shellcode execution); ATT&CK T1106, T1620",
        (Step("code.native", "ctypes.dlopen", "{libc}", tags=(EVADE,)),
         Step("code.native", "ctypes.dlsym", "{native_sym}", tags=(EXEC, EVADE), damaging=True)),
    ),
    Scenario(
        "slow-cred-drip", "credential-file-exfil",
        "Low and slow: reads one credential file now, another later, and posts them much later, "
        "interleaved with the test's own work.",
        "technique, no confirmed package case: low-and-slow exfiltration; ATT&CK T1030, T1029",
        (read("{token_file}"), read("${home}/.ssh/{ssh_key}"),
         *http_post("attacker_domain", "attacker_ip")),
        slow=True, unordered=((0, 1),),
    ),
    Scenario(
        "slow-dns-drip", "dns-exfil",
        "Low and slow: one secret, leaked a DNS label at a time between the test's own work.",
        "technique (DNS exfiltration as torchtriton, spread out); ATT&CK T1030, T1048",
        (env_read("{secret_env}"),
         dns("{hex}.{label}.{attacker_domain}", tags=(L,), damaging=True),
         dns("{hex}.{label}.{attacker_domain}", tags=(L,), repeat=(2, 5))),
        slow=True,
    ),
    Scenario(
        "recon-beacon", "recon",
        "Collects user, host and environment facts and beacons them to an out-of-band domain.",
        "MAL-2026-13728 (dlmm: host facts sent on import); OAST fallbacks (*.oast.fun) in ossf/malicious-packages#1385; ATT&CK T1082, T1033, T1071",
        (read("/etc/passwd", tags=(RECON,)), read("/etc/hostname", tags=(RECON,)),
         spawn("{recon_tool}", tags=(RECON,)), env_dump(tags=(RECON,)),
         dns("{label}.{oast_domain}", tags=(L, RECON), damaging=True)),
        unordered=((0, 1, 2, 3),),
    ),
    Scenario(
        "token-stealer", "saas-exfil",
        "Reads browser and chat-client token stores (no ${home} secret by name) and posts them to a webhook.",
        "W4SP stealer (PyPI, Nov 2022: Discord tokens and browser cookies to Discord webhooks); ATT&CK T1539, T1555.003, T1567.004",
        (read("{discord_store}"), *http_post("saas", "saas_ip", "web_port")),
    ),
    Scenario(
        "tamper-then-steal", "evasion",
        "Replaces the trace and profile functions (a common anti-analysis trick), then steals a secret.",
        "technique, nearest cases MAL-2026-5324 and MAL-2026-15933 (analysis evasion); ATT&CK T1562.001, T1497",
        (Step("sys.tamper", "sys.settrace", "settrace", tags=(TAMPER, EVADE)),
         Step("sys.tamper", "sys.setprofile", "setprofile", tags=(TAMPER, EVADE)),
         env_read("{secret_env}"),
         connect("{attacker_ip}:{exfil_port}")),
        unordered=((0, 1),),
    ),
    Scenario(
        "pickle-payload", "deserialization",
        "Loads a fixture or model pickle whose reduce step calls os.system.",
        "MAL-2025-5096 (aliyun-ai-labs-snippets-sdk: a pickled model exfiltrates host facts on load); ATT&CK T1059.006 (ATLAS AML.T0011)",
        (read("{tmpdir}/{pickle_file}", tags=(), ),
         Step("code.exec", "pickle.find_class", "posix.system", tags=(EXEC,), cls="module"),
         Step("proc.spawn", "os.system", "/usr/bin/sh -c 'id > /dev/null'", tags=(EXEC,), damaging=True)),
    ),
    # ---- in the browser: a compromised third-party script in the page under test
    Scenario(
        "browser-token-exfil", "browser-exfil",
        "A script in the page injects an external script from an attacker domain, which reads the "
        "app's API token from localStorage and POSTs it to the attacker.",
        "Magecart-style script injection (British Airways 2018, Ticketmaster 2018); polyfill.io CDN "
        "takeover (June 2024: a widely included script served a malicious payload); ATT&CK T1185, T1539, T1041",
        (dom("script.external", "http://{attacker_domain}{js_path}", tags=(EXEC,)),
         browser("GET", "http://{attacker_domain}{js_path}", "script {page}", tags=(EXEC,)),
         browser("POST", "http://{attacker_domain}{collect_path}", "fetch {page}", tags=(C, L), damaging=True)),
        unordered=((0, 1),), browser=True,
    ),
    Scenario(
        "form-jacking", "browser-exfil",
        "A script in the page rewrites the login form's action to an attacker host; the user's "
        "credentials are posted there on submit.",
        "Form-jacking (Magecart; Newegg 2018, card skimmers that rewrite or clone checkout forms); ATT&CK T1056.003, T1041",
        (dom("form.action", "http://{attacker_domain}{collect_path}", tags=(C,)),
         browser("POST", "http://{attacker_domain}{collect_path}", "document navigation", tags=(C, L),
                 damaging=True)),
        browser=True,
    ),
    Scenario(
        "beacon-exfil", "browser-exfil",
        "A script in the page sends the app's token with navigator.sendBeacon, which outlives the page.",
        "sendBeacon exfiltration in web skimmers (the beacon survives page unload and is not awaited); ATT&CK T1041, T1567",
        (browser("POST", "http://{attacker_domain}{collect_path}", "ping {page}", tags=(C, L), damaging=True),),
        browser=True,
    ),
    # ---- hard negatives: benign, yet each looks like part of an attack
    Scenario(
        "hn-config-read", "benign", "A tool reads its own config and the user's gitconfig from HOME.",
        "Benign: config discovery (ruff, black, pip read config in HOME; pip.conf is classed a secret)",
        (read("${home}/.config/{app}/config.toml", tags=()), read("${home}/.gitconfig", tags=()),
         read("${home}/.config/pip/pip.conf", tags=())),
        malicious=False, phases=("call", "setup", "collect"), unordered=((0, 1, 2),),
    ),
    Scenario(
        "hn-loopback-server", "benign", "A test starts a server on loopback and talks to it.",
        "Benign: local test servers (werkzeug, httpx, urllib3 suites)",
        (Step("net.bind", "socket.bind", "{loop_host}:0", "tcp"),
         dns("localhost"),
         connect("127.0.0.1:{port}", tags=(), damaging=False)),
        malicious=False, phases=("call", "setup"),
    ),
    Scenario(
        "hn-spawn-git", "benign", "A test initialises a git repository in its tmp dir and queries it.",
        "Benign: VCS-aware tools (setuptools-scm, pre-commit, virtualenv tests)",
        (spawn("/usr/bin/git init -q {tmpdir}", tags=()),
         spawn("/usr/bin/git -C {tmpdir} status --porcelain", tags=()),
         read("{tmpdir}/.git/config", tags=())),
        malicious=False,
    ),
    Scenario(
        "hn-spawn-python", "benign", "A test runs the interpreter in a child to check a CLI entry point.",
        "Benign: subprocess tests of console scripts (click, virtualenv suites)",
        (spawn(f"{PY} -c 'import sys; print(sys.version)'", tags=()),
         Step("code.exec", "compile", "<string>", child=1)),
        malicious=False,
    ),
    Scenario(
        "hn-cache-write", "benign", "A tool writes its cache under ~/.cache and a scratch file in tmp.",
        "Benign: caches (pip, pytest, mypy write under ~/.cache)",
        (Step("fs.write", "os.mkdir", "${home}/.cache/{app}", "0o777"),
         write("${home}/.cache/{app}/index.json", "w"),
         write("{tmpdir}/scratch-{word}.json", "w")),
        malicious=False, phases=("call", "teardown"),
    ),
    Scenario(
        "hn-native-lib", "benign", "A test loads libc through ctypes to call a harmless function.",
        "Benign: ctypes use in tests (time, getpid, find_library)",
        (Step("code.native", "ctypes.dlopen", "{libc}"),
         Step("code.native", "ctypes.dlsym", "getpid")),
        malicious=False,
    ),
    Scenario(
        "hn-unresolvable-host", "benign",
        "A test checks its HTTP client's errors: a host name that does not resolve, then a connect to a "
        "non-routable address that must fail.",
        "Benign: error-path tests of HTTP clients (requests, urllib3, httpx suites look up names that do not "
        "exist and connect to a tarpit address for timeouts)",
        (dns("{bad_host}"), connect("{tarpit}:{web_port}", tags=(), damaging=False)),
        malicious=False,
    ),
    Scenario(
        "hn-token-to-loopback", "benign",
        "A test sets a fake token in the environment, reads it back and sends it to its own loopback server.",
        "Benign: auth tests of HTTP clients (requests, httpx suites)",
        (Step("env.write", "os.putenv", "{test_token}"), env_read("{test_token}", tags=()),
         Step("net.bind", "socket.bind", "127.0.0.1:0", "tcp"),
         connect("127.0.0.1:{port}", tags=(), damaging=False)),
        malicious=False,
    ),
)

BY_ID: dict[str, Scenario] = {s.id: s for s in SCENARIOS}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.family for s in SCENARIOS))


def get(scenario_id: str) -> Scenario:
    try:
        return BY_ID[scenario_id]
    except KeyError:
        raise ScenarioError(f"unknown scenario {scenario_id!r}; known: {', '.join(BY_ID)} "
                            "(`sandhop inject --list-scenarios` prints them)") from None


def select(spec: str | Iterable[str] | None) -> tuple[Scenario, ...]:
    """Scenarios named by a selection: `all`, `attacks`, `benign`, ids, or `family:NAME`, comma
    separated or as a list; `-id` or `-family:NAME` removes. Order follows the library."""
    items = ["all"] if spec is None else (spec.split(",") if isinstance(spec, str) else list(spec))
    items = [i.strip() for i in items if i and i.strip()]
    if not items:
        raise ScenarioError("empty scenario selection; use all, attacks, benign, ids or family:NAME")
    chosen: set[str] = set()
    if all(i.startswith("-") for i in items):
        chosen = set(BY_ID)
    for item in items:
        drop = item.startswith("-")
        ids = _ids_of(item.lstrip("-"))
        chosen = chosen - ids if drop else chosen | ids
    return tuple(s for s in SCENARIOS if s.id in chosen)


def _ids_of(name: str) -> set[str]:
    if name == "all":
        return set(BY_ID)
    if name == "attacks":
        return {s.id for s in SCENARIOS if s.malicious}
    if name == "benign":
        return {s.id for s in SCENARIOS if not s.malicious}
    if name.startswith("family:"):
        family = name[len("family:"):]
        if family not in FAMILIES:
            raise ScenarioError(f"unknown scenario family {family!r}; known: {', '.join(FAMILIES)}")
        return {s.id for s in SCENARIOS if s.family == family}
    return {get(name).id}


# --------------------------------------------------------------------------- generation

def generate(scenario: Scenario | str, rng: random.Random | int, *, phase: str | None = None,
             slow: bool | None = None) -> list[Event]:
    """One attack (or hard negative) as events, drawn from `rng`.

    The events are labelled (`malicious`, `attack`, `tags` = observed + the step's inferred tags)
    and carry *relative* placement: `seq` is the step index, `t_ns` the offset from the first
    step, `pid` the process index (0 = the test's own process, k = its k-th child). `sandhop
    inject` turns these into a host test's numbering. Targets are normalised as the recorder
    normalises them (an IP spelled in hex is stored canonical).
    """
    s = get(scenario) if isinstance(scenario, str) else scenario
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    draw = _Draw(rng)
    phase = phase or (s.phases[0] if rng.random() < 0.7 else rng.choice(s.phases))
    if phase not in s.phases:
        raise ScenarioError(f"scenario {s.id!r} fires in {', '.join(s.phases)}, not {phase!r}")
    slow = s.slow if slow is None else slow
    order = list(range(len(s.steps)))
    for group in s.unordered:  # interchangeable steps (which file is read first) in a drawn order
        shuffled = rng.sample(group, len(group))
        order[group[0]:group[-1] + 1] = shuffled
    events, t = [], 0
    for index in order:
        step = s.steps[index]
        for _ in range(rng.randint(*step.repeat)):
            target = _render(step, draw, rng)
            cls = step.cls or target_class(step.category, target, step.detail)
            tags = observed_tags(step.category, cls) + (step.tags if s.malicious else ())
            events.append(Event(
                category=step.category, op=step.op, target=target, target_class=cls,
                detail=step.detail.format_map(draw) if "{" in step.detail else step.detail,
                phase=phase, seq=index, t_ns=t, pid=step.child,
                malicious=s.malicious, attack=s.id, tags=tags,
            ))
            # burst: micro- to milliseconds apart; slow: seconds to a minute
            t += int(rng.uniform(0.5, 60) * 1e9) if slow else int(rng.lognormvariate(11, 2))
    return events


def _render(step: Step, draw: _Draw, rng: random.Random) -> str:
    target = step.target.format_map(draw)
    if step.category in ("net.connect", "net.send", "net.bind") and not target.startswith(("/", "${")):
        host, _, port = target.rpartition(":")
        return format_address(_spell_ip(host, rng) if host[:1].isdigit() or ":" in host else host, port)
    if step.category == "proc.spawn":
        return shlex.join(shlex.split(target))
    return target


def damaging_index(events: Sequence[Event], scenario: Scenario | str) -> int | None:
    """Position in `events` (one generated attack) of its damaging step."""
    s = get(scenario) if isinstance(scenario, str) else scenario
    k = s.damaging_step
    return None if k is None else next(i for i, e in enumerate(events) if e.seq == k)


def check_library(scenarios: Sequence[Scenario] = SCENARIOS) -> list[str]:
    """Problems with the library's own data (the tests assert there are none)."""
    problems = []
    if len({s.id for s in scenarios}) != len(scenarios):
        problems.append("duplicate scenario ids")
    for s in scenarios:
        where = f"scenario {s.id}"
        if not s.source or not s.description:
            problems.append(f"{where}: needs a description and a source")
        if any(p not in PHASES for p in s.phases):
            problems.append(f"{where}: unknown phase in {s.phases}")
        damaging = [i for i, st in enumerate(s.steps) if st.damaging]
        if s.malicious and len(damaging) != 1:
            problems.append(f"{where}: an attack has exactly one damaging step, found {len(damaging)}")
        if not s.malicious and (damaging or s.tags):
            problems.append(f"{where}: a hard negative has no damaging step and no inferred tags")
        for group in s.unordered:
            if list(group) != list(range(group[0], group[0] + len(group))) or group[-1] >= len(s.steps) \
                    or len(group) < 2:
                problems.append(f"{where}: unordered group {group} is not a run of 2+ consecutive steps")
            elif s.damaging_step in group:
                problems.append(f"{where}: the damaging step cannot be in an unordered group")
        if s.malicious and not s.tags:
            problems.append(f"{where}: an attack shows at least one inferred behaviour tag")
        for st in s.steps:
            if st.category not in CATEGORIES:
                problems.append(f"{where}: unknown category {st.category}")
            if any(t not in INFERRED_TAGS for t in st.tags):
                problems.append(f"{where}: step tags {st.tags} are not inferred behaviour tags")
    return problems
