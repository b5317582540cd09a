"""The policy language: every rule form parses and matches what it says, every mistake is a
`PolicyError` that names file, line and column, and host patterns are anchored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandhop.enforcement import events as ev
from sandhop.enforcement.engine import PolicyEngine
from sandhop.enforcement.policy import (HOST_CLASSES, VARIABLES, Policy, PolicyError, Rule, glob_regex,
                                        parse_policy, parse_rule, specialise)

# A machine with fixed roots, so that patterns and targets are portable in a known way.
ROOTS = ev.Roots(tmp="/tmp/sh", home="/home/u", cwd="/work/proj",
                 site=("/opt/py/lib/python3.11/site-packages",), stdlib="/opt/py/lib/python3.11",
                 python="/opt/py")


def rule(line: str) -> Rule:
    return parse_rule(line, roots=ROOTS, source="test.policy")


def matches(line: str, category: str, target: str, detail: str = "") -> bool:
    """Whether the rule's matcher for `category` admits the normalised `target`."""
    r = rule(line)
    assert category in r.categories
    return specialise(r, category)(target, ev.target_class(category, target, detail))


# --------------------------------------------------------------------------- grammar: effects and categories

@pytest.mark.parametrize("effect", ["allow", "deny"])
def test_effects_parse_into_rule_fields(effect):
    r = rule(f"{effect}  fs.read   ${{tmp}}/**")
    assert (r.effect, r.category, r.pattern, r.redirect_to) == (effect, "fs.read", "${tmp}/**", "")
    assert r.categories == frozenset({"fs.read"})
    assert r.text == f"{effect} fs.read ${{tmp}}/**"


def test_redirect_takes_a_destination():
    r = rule("redirect fs.write ${home}/** ${tmp}/sandhop-overlay")
    assert (r.effect, r.redirect_to) == ("redirect", "${tmp}/sandhop-overlay")
    assert matches("redirect fs.write ${home}/** ${tmp}/o", "fs.write", "${home}/.cache/x")


@pytest.mark.parametrize("category", ev.CATEGORIES)
def test_every_category_parses(category):
    assert rule(f"allow {category} *").categories == frozenset({category})


@pytest.mark.parametrize("family", sorted({c.split(".")[0] for c in ev.CATEGORIES}))
def test_family_wildcards_cover_exactly_their_family(family):
    r = rule(f"deny {family}.* *")
    assert r.categories == frozenset(c for c in ev.CATEGORIES if c.split(".")[0] == family)


def test_star_category_covers_every_category():
    r = rule("deny * @home.secret")
    assert r.categories == frozenset(ev.CATEGORIES)
    assert specialise(r, "fs.read")("${home}/.ssh/id_rsa", "home.secret")
    assert not specialise(r, "fs.read")("${home}/notes.txt", "home")


def test_fs_family_rule_matches_each_fs_category():
    for category in ("fs.read", "fs.write", "fs.delete", "fs.meta"):
        assert matches("allow fs.* ${tmp}/**", category, "${tmp}/a/b")
        assert not matches("allow fs.* ${tmp}/**", category, "${home}/a")


# --------------------------------------------------------------------------- grammar: classes and paths

@pytest.mark.parametrize("cls,category,target,detail", [
    ("home.secret", "fs.read", "${home}/.ssh/id_rsa", ""),
    ("proc.secret", "fs.read", "/proc/self/environ", ""),
    ("env.secret", "env.read", "AWS_SECRET_ACCESS_KEY", ""),
    ("python", "proc.spawn", "'${python}/bin/python3.11' -c pass", ""),
    ("loopback", "net.connect", "127.0.0.1:80", ""),
    ("unix", "net.connect", "${tmp}/s.sock", "unix"),
    ("self", "code.native", "<self>", ""),
])
def test_class_patterns_match_the_target_class(cls, category, target, detail):
    assert ev.target_class(category, target, detail) == cls
    assert matches(f"deny {category} @{cls}", category, target, detail)
    other = "tmp" if cls != "tmp" else "home"
    assert not specialise(rule(f"deny {category} @{cls}"), category)(target, other)


@pytest.mark.parametrize("pattern,target,expected", [
    ("${tmp}/**", "${tmp}", True),                    # `dir/**` includes the folder itself
    ("${tmp}/**", "${tmp}/a/b/c.txt", True),
    ("${tmp}/**", "${tmpx}/a", False),
    ("${tmp}/*", "${tmp}/a", True),
    ("${tmp}/*", "${tmp}/a/b", False),                # `*` does not cross `/`
    ("${tmp}/?.txt", "${tmp}/a.txt", True),
    ("${tmp}/?.txt", "${tmp}/ab.txt", False),
    ("**/__pycache__/*.pyc", "${site}/pkg/__pycache__/m.pyc", True),
    ("**/__pycache__/*.pyc", "${site}/pkg/m.pyc", False),
    ("${home}/.local/lib/**/*.pth", "${home}/.local/lib/python3.11/site-packages/x.pth", True),
    ("${tmp}/a.[ch]", "${tmp}/a.c", True),
    ("${tmp}/a.[ch]", "${tmp}/a.o", False),
    ("${tmp}/a.[!ch]", "${tmp}/a.o", True),
    ("${tmp}/a.[!ch]", "${tmp}/a.c", False),
    ("/etc/**", "/etc/hosts", True),
    ("/etc/**", "/etcetera/x", False),
])
def test_path_globs(pattern, target, expected):
    assert matches(f"allow fs.read {pattern}", "fs.read", target) is expected


def test_path_glob_character_ranges():
    assert matches("allow fs.read ${tmp}/[a-z].txt", "fs.read", "${tmp}/b.txt")
    assert re.fullmatch(glob_regex("/x/[0-9]"), "/x/5")


@pytest.mark.parametrize("variable", VARIABLES)
def test_every_variable_is_accepted_in_patterns_and_destinations(variable):
    r = rule(f"redirect fs.write ${{{variable}}}/x/** ${{{variable}}}/y")
    assert specialise(r, "fs.write")(f"${{{variable}}}/x/z", "other")
    assert not specialise(r, "fs.write")(f"${{{variable}}}/y/z", "other")


def test_tilde_is_home():
    assert matches("deny fs.read ~/.ssh/**", "fs.read", "${home}/.ssh/id_rsa")
    assert matches("deny fs.read ~", "fs.read", "${home}")
    assert not matches("deny fs.read ~/.ssh/**", "fs.read", "${home}/.sshx")


def test_absolute_patterns_are_made_portable_like_targets():
    # The engine compares portable targets; a pattern naming this machine's home must match them.
    assert matches("deny fs.read /home/u/.aws/**", "fs.read", "${home}/.aws/credentials")
    assert matches("deny fs.write /home/u/.bashrc", "fs.write", "${home}/.bashrc")
    assert matches("deny fs.write /tmp/sh/../sh/x", "fs.write", "${tmp}/x")


def test_pattern_above_a_root_covers_targets_under_that_root():
    assert matches("deny fs.read /**", "fs.read", "${home}/.ssh/id_rsa")
    assert matches("deny fs.read /home/**", "fs.read", "${home}/notes.txt")


def test_pattern_through_a_symlinked_folder_matches_the_real_target(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    roots = ev.Roots(tmp=str(tmp_path.resolve()), home="/home/u", cwd="/work/proj", site=(), stdlib="/s",
                     python="/p")
    target = ev.portable_path(ev.normalise_path(tmp_path / "link" / "secret.txt"), roots)
    assert target == "${tmp}/real/secret.txt"
    r = parse_rule(f"deny fs.read {tmp_path}/link/**", roots=roots)
    assert r.match(target, "tmp")


# --------------------------------------------------------------------------- grammar: hosts and ports

@pytest.mark.parametrize("pattern,target,expected", [
    ("example.com:443", "example.com:443", True),
    ("example.com:443", "example.com:80", False),
    ("EXAMPLE.com.:443", "example.com:443", True),                 # patterns are normalised too
    ("bücher.de:443", "xn--bcher-kva.de:443", True),
    ("*.pypi.org:443", "files.pypi.org:443", True),
    ("*.pypi.org:443", "pypi.org:443", False),
    ("10.0.0.0/8:*", "10.1.2.3:5432", True),
    ("10.0.0.0/8:*", "11.1.2.3:5432", False),
    ("[fd00::/8]:*", "[fd12::1]:80", True),
    ("[fd00::/8]:*", "[fe80::1]:80", False),
    ("[::1]:8080", "[::1]:8080", True),
    ("[0:0:0:0:0:0:0:1]:8080", "[::1]:8080", True),
    ("[::ffff:127.0.0.1]:80", "127.0.0.1:80", True),
    ("2130706433:80", "127.0.0.1:80", True),
    ("loopback:*", "127.0.0.1:1", True),
    ("loopback:*", "[::1]:1", True),
    ("loopback:*", "localhost:1", True),
    ("loopback:*", "10.0.0.1:1", False),
    ("private_net:*", "192.168.1.1:80", True),
    ("private_net:*", "8.8.8.8:80", False),
    ("metadata_ip:*", "169.254.169.254:80", True),
    ("metadata_ip:*", "metadata.google.internal:80", True),
    ("metadata_ip:*", "[fd00:ec2::254]:80", True),
    ("public_net:*", "8.8.8.8:53", True),
    ("public_net:*", "127.0.0.1:53", False),
    ("*:8000-8999", "example.com:8080", True),
    ("*:8000-8999", "example.com:9000", False),
    ("*:8000-8999", "example.com:7999", False),
    ("*:*", "example.com:1", True),
    ("*", "example.com:1", True),
    ("example.com", "example.com:22", True),                        # no port: any port
    ("example.com:443", "example.com:*", False),                    # unknown port: no exact match
])
def test_address_patterns(pattern, target, expected):
    assert matches(f"allow net.connect {pattern}", "net.connect", target) is expected


@pytest.mark.parametrize("cls", [c for c in HOST_CLASSES])
def test_every_host_class_is_a_bare_word(cls):
    r = rule(f"deny net.connect {cls}:*")
    m = specialise(r, "net.connect")
    assert m("h:1", cls) and not m("h:1", "unix" if cls != "unix" else "domain")


@pytest.mark.parametrize("pattern,target,expected", [
    ("unix:${tmp}/**", "${tmp}/pytest/s.sock", True),
    ("unix:${tmp}/**", "${home}/s.sock", False),
    ("unix:@*", "@abstract-name", True),
    ("unix:@x*", "@abstract", False),
])
def test_unix_socket_patterns(pattern, target, expected):
    assert matches(f"allow net.connect {pattern}", "net.connect", target, detail="unix") is expected
    # a unix pattern never admits an IP address
    assert not matches(f"allow net.connect {pattern}", "net.connect", "127.0.0.1:80")


def test_net_family_rule_covers_lookups_through_the_host_half():
    r = rule("deny net.* metadata_ip:*")
    assert specialise(r, "net.dns")("metadata.google.internal", "metadata_ip")
    assert specialise(r, "net.send")("169.254.169.254:53", "metadata_ip")
    assert not specialise(r, "net.dns")("pypi.org", "domain")
    assert matches("redirect net.dns *.invalid nxdomain", "net.dns", "foo.invalid")
    assert not matches("redirect net.dns *.invalid nxdomain", "net.dns", "invalid")


def test_browser_requests_match_on_the_urls_host_and_port():
    assert matches("allow browser.request *.example.com:443", "browser.request", "https://www.example.com/a")
    assert not matches("allow browser.request *.example.com:443", "browser.request", "http://www.example.com/a")
    assert matches("deny browser.request metadata_ip:*", "browser.request", "http://169.254.169.254/latest")
    # userinfo that spells a trusted name does not change the host
    assert not matches("allow browser.request example.com:*", "browser.request", "http://example.com@evil.net/")


@pytest.mark.parametrize("pattern,target,expected", [
    ("git", "git status", True),
    ("git", "/usr/bin/git status", True),                 # a bare name matches the tool anywhere
    ("git", "gitk", False),
    ("python*", "'${python}/bin/python3.11' -c pass", True),
    ("${python}/bin/*", "'${python}/bin/python3.11' -", True),
    ("${python}/bin/*", "/usr/bin/python3", False),
    ("/usr/bin/curl", "/usr/bin/curl http://x", True),
    ("/usr/bin/curl", "curl http://x", False),
])
def test_spawn_patterns(pattern, target, expected):
    assert matches(f"allow proc.spawn {pattern}", "proc.spawn", target) is expected


@pytest.mark.parametrize("category,pattern,target,expected", [
    ("code.import", "requests", "requests", True),
    ("code.import", "requests", "requests.adapters", False),
    ("code.import", "requests.*", "requests.adapters", True),
    ("code.import", "requests.*", "requests", False),
    ("code.import", "requests**", "requests.adapters", True),
    ("env.read", "AWS_*", "AWS_SECRET_ACCESS_KEY", True),
    ("env.read", "AWS_*", "XAWS_KEY", False),
    ("code.native", "libc.so.6", "libc.so.6", True),
    ("code.native", "${site}/**", "${site}/m/_x.so", True),
    ("sys.tamper", "addaudithook", "addaudithook", True),
])
def test_name_module_and_native_patterns(category, pattern, target, expected):
    assert matches(f"allow {category} {pattern}", category, target) is expected


# --------------------------------------------------------------------------- files: extends, default, comments

def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_policy_file_with_comments_extends_and_default(tmp_path):
    path = write(tmp_path, "mine.policy", (
        "# my project's policy\n"
        "\n"
        "extends  medium        # start from the medium tier\n"
        "default  deny\n"
        "   # an indented comment\n"
        "allow    net.connect  *.pypi.org:443   # trailing comment\n"
        "allow    dom.mutation https://example.com/#main\n"
        "redirect fs.write     ${home}/**  ${tmp}/over#lay\n"
    ))
    engine = PolicyEngine(ROOTS)
    policy = engine.load_file(path)
    assert isinstance(policy, Policy)
    assert policy.default == "deny" and policy.extends == "medium"
    own = policy.rules[len(engine.policies["medium"].rules):]
    assert policy.rules[:len(engine.policies["medium"].rules)] == engine.policies["medium"].rules
    assert [r.text for r in own] == [
        "allow net.connect *.pypi.org:443",
        "allow dom.mutation https://example.com/#main",   # `#` inside a token is not a comment
        "redirect fs.write ${home}/** ${tmp}/over#lay",
    ]
    name = str(path.resolve())
    assert [r.rule_id for r in own] == [f"{name}:6", f"{name}:7", f"{name}:8"]
    assert own[1].match("https://example.com/#main", "dom")
    assert own[2].redirect_to == "${tmp}/over#lay"


def test_default_is_inherited_through_extends(tmp_path):
    engine = PolicyEngine(ROOTS)
    assert engine.load_file(write(tmp_path, "a.policy", "extends low\n")).default == "allow"
    assert engine.load_file(write(tmp_path, "b.policy", "extends medium\n")).default == "deny"
    assert engine.load_file(write(tmp_path, "c.policy", "extends low\ndefault deny\n")).default == "deny"


def test_a_file_can_extend_another_file(tmp_path):
    base = write(tmp_path, "base.policy", "default deny\nallow fs.read ${tmp}/**\n")
    child = write(tmp_path, "child.policy", f"extends {base}\ndeny fs.read ${{tmp}}/secret\n")
    policy = PolicyEngine(ROOTS).load_file(child)
    assert [r.text for r in policy.rules] == ["allow fs.read ${tmp}/**", "deny fs.read ${tmp}/secret"]
    assert policy.default == "deny" and policy.extends == str(base.resolve())


def test_relative_extends_is_relative_to_the_policy_file(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    write(tmp_path / "policies", "base.policy", "default deny\n")
    child = write(tmp_path / "policies", "child.policy", "extends base.policy\n")
    monkeypatch.chdir(tmp_path)
    assert PolicyEngine(ROOTS).load_file(child).default == "deny"


def test_extends_cycle_is_a_policy_error(tmp_path):
    a, b = tmp_path / "a.policy", tmp_path / "b.policy"
    a.write_text(f"extends {b}\n")
    b.write_text(f"extends {a}\n")
    with pytest.raises(PolicyError, match="cycle|extends"):
        PolicyEngine(ROOTS).load_file(a)


# --------------------------------------------------------------------------- bad input

def policy_error(tmp_path: Path, text: str, *, via_config: bool = False) -> PolicyError:
    path = write(tmp_path, "bad.policy", text)
    engine = PolicyEngine(ROOTS)
    with pytest.raises(PolicyError) as info:
        engine.config(str(path)) if via_config else engine.load_file(path)
    return info.value


# (policy text, line, column, what the message must say). Columns are 1-based.
BAD_POLICIES = {
    "unknown effect": ("default deny\npermit fs.read ${tmp}/**\n", 2, 1,
                       "expected an effect (allow, deny, redirect)"),
    "unknown category": ("default deny\nallow fs.bogus ${tmp}/**\n", 2, 7, "unknown category 'fs.bogus'"),
    "unknown family": ("default deny\nallow fsx.* ${tmp}/**\n", 2, 7, "a family such as `fs.*`"),
    "missing pattern": ("default deny\nallow fs.read\n", 2, 15, "expected a target pattern"),
    "missing category": ("default deny\nallow\n", 2, 7, "expected a category"),
    "redirect without destination": ("default deny\nredirect fs.write ${home}/**\n", 2, 29,
                                     "a redirect needs exactly one destination"),
    "extra token after allow": ("default deny\nallow fs.read ${tmp}/** ${tmp}/x\n", 2, 25,
                                "unexpected '${tmp}/x': only a redirect takes a destination"),
    "unknown variable": ("default deny\nallow fs.read ${tmp}/a/${foo}/**\n", 2, 24, "unknown variable ${foo}"),
    "unknown variable in destination": ("default deny\nredirect fs.write ${home}/** ${foo}/x\n", 2, 30,
                                        "unknown variable ${foo}"),
    "unknown class": ("default deny\ndeny fs.read @nope\n", 2, 15, "unknown target class 'nope'"),
    "relative path": ("default deny\nallow fs.read relative/x\n", 2, 15, "a path pattern must be absolute"),
    "unclosed set": ("default deny\nallow fs.read ${tmp}/[ab\n", 2, 22, "unclosed `[`"),
    "bad CIDR": ("default deny\nallow net.connect 10.0.0.0/33:*\n", 2, 19, "is not a CIDR network"),
    "star in the middle of a host": ("default deny\nallow net.connect a.*.com:443\n", 2, 19,
                                     "`*` only as a whole label prefix"),
    "star glued to a name": ("default deny\nallow net.connect *evil.com:443\n", 2, 19,
                             "`*` only as a whole label prefix"),
    "unbracketed IPv6": ("default deny\nallow net.connect ::1:80\n", 2, 19, "write IPv6 hosts in brackets"),
    "bad default": ("default maybe\n", 1, 9, "expected `default allow` or `default deny`"),
    "extends after a rule": ("default deny\nallow fs.read ${tmp}/**\nextends medium\n", 3, 1,
                             "`extends` must come before the first rule"),
    "extends without a name": ("extends\n", 1, 1, "expected `extends NAME`"),
}


@pytest.mark.parametrize("kind", sorted(BAD_POLICIES))
def test_policy_errors_name_file_line_column_and_what_was_expected(tmp_path, kind):
    text, line, column, expected = BAD_POLICIES[kind]
    err = policy_error(tmp_path, text)
    source = str((tmp_path / "bad.policy").resolve())
    assert (err.source, err.line, err.column) == (source, line, column)
    message = str(err)
    assert message.startswith(f"{source}:{line}:{column}: ")
    assert expected in message
    # the offending line is quoted with a caret under the column
    raw = text.splitlines()[line - 1]
    assert f"\n    {raw}\n    {' ' * (column - 1)}^" in message


@pytest.mark.parametrize("port,problem", [("99999", "outside 0-65535"), ("443-80", "outside 0-65535"),
                                          ("https", "expected a port, a range such as 8000-8999, or `*`"),
                                          ("-1", "expected a port")])
def test_bad_port_is_a_policy_error_at_the_pattern(tmp_path, port, problem):
    err = policy_error(tmp_path, f"default deny\nallow net.connect example.com:{port}\n", via_config=True)
    pattern_column = len("allow net.connect ") + 1
    assert err.line == 2 and pattern_column <= err.column <= pattern_column + len(f"example.com:{port}")
    assert str(err).startswith(f"{(tmp_path / 'bad.policy').resolve()}:2:{err.column}: ")
    assert problem in str(err)


def test_unknown_variable_in_a_unix_pattern_points_at_the_variable(tmp_path):
    err = policy_error(tmp_path, "default deny\nallow net.connect unix:${foo}/s.sock\n")
    assert err.column == len("allow net.connect unix:") + 1


def test_redirect_with_two_destinations_points_at_the_second(tmp_path):
    err = policy_error(tmp_path, "default deny\nredirect fs.write ${home}/** ${tmp}/a ${tmp}/b\n")
    assert "a redirect needs exactly one destination" in str(err)
    assert (err.line, err.column) == (2, len("redirect fs.write ${home}/** ${tmp}/a ") + 1)


def test_missing_default_without_extends_names_the_file(tmp_path):
    err = policy_error(tmp_path, "allow fs.read ${tmp}/**\n")
    assert str(err).startswith(f"{(tmp_path / 'bad.policy').resolve()}: ")
    assert "no `default allow|deny` line and no `extends`" in str(err)


def test_extends_of_a_missing_file_names_the_line_and_the_missing_file(tmp_path):
    missing = tmp_path / "nowhere.policy"
    err = policy_error(tmp_path, f"extends {missing}\n", via_config=True)
    source = str((tmp_path / "bad.policy").resolve())
    assert (err.line, err.column) == (1, 9)
    assert str(err).startswith(f"{source}:1:9: cannot extend '{missing}'")
    assert "no such policy file" in str(err)
    assert isinstance(err.__cause__, PolicyError)


def test_config_of_a_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        PolicyEngine(ROOTS).config(str(tmp_path / "absent.policy"))


def test_bad_grant_is_rejected_when_the_config_is_made():
    with pytest.raises(PolicyError, match=r"grant 'net.connect a\.\*\.com:443':1:.*whole label prefix"):
        PolicyEngine(ROOTS).config("medium", grants=["net.connect a.*.com:443"])
    with pytest.raises(PolicyError, match="unknown category 'fs.nope'"):
        PolicyEngine(ROOTS).config("medium", revocations=["fs.nope ${tmp}/**"])


def test_non_utf8_policy_is_a_policy_error(tmp_path):
    path = tmp_path / "latin1.policy"
    path.write_bytes("default deny\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match="not UTF-8"):
        PolicyEngine(ROOTS).load_file(path)


def test_parse_policy_without_resolver_rejects_extends():
    with pytest.raises(PolicyError, match="`extends` is not available here"):
        parse_policy("extends medium\n", name="p", roots=ROOTS)


# --------------------------------------------------------------------------- host anchoring

@pytest.mark.parametrize("host,expected", [
    ("x.a.com", True), ("y.x.a.com", True), ("X.A.COM.", True),
    ("a.com.evil.net", False), ("evila.com", False), ("a.com", False), ("xa.com", False),
    ("a.com.", False), ("x.a.co", False),
])
def test_suffix_host_patterns_are_anchored(host, expected):
    target = ev.format_address(host, 443)
    assert matches("allow net.connect *.a.com:443", "net.connect", target) is expected
    assert matches("allow net.dns *.a.com", "net.dns", ev.normalise_host(host)) is expected


@pytest.mark.parametrize("host,expected", [
    ("allowed.com", True), ("ALLOWED.com.", True),
    ("evilallowed.com", False), ("allowed.com.evil.net", False), ("x.allowed.com", False), ("allowed.co", False),
])
def test_exact_host_patterns_are_anchored(host, expected):
    assert matches("allow net.connect allowed.com:443", "net.connect", ev.format_address(host, 443)) is expected
    assert matches("allow net.dns allowed.com", "net.dns", ev.normalise_host(host)) is expected


label = st.text(alphabet="abcxyz019-", min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(st.lists(label, min_size=1, max_size=4), st.lists(label, min_size=1, max_size=4))
def test_suffix_pattern_matches_exactly_the_subdomains(domain_labels, host_labels):
    domain, host = ".".join(domain_labels), ".".join(host_labels)
    m = specialise(rule(f"allow net.connect *.{domain}:*"), "net.connect")
    target = ev.format_address(host, 80)
    expected = ev.normalise_host(host).endswith("." + ev.normalise_host(domain))
    assert m(target, ev.target_class("net.connect", target)) is expected
    exact = specialise(rule(f"allow net.connect {domain}:*"), "net.connect")
    assert exact(target, "domain") is (ev.normalise_host(host) == ev.normalise_host(domain))
