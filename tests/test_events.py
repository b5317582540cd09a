"""Target normalisation, classes and tags: examples that matter, and properties over many inputs."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandhop.enforcement import events as ev


# --------------------------------------------------------------------------- paths

def test_dotdot_is_resolved():
    assert ev.normalise_path("/tmp/../etc/passwd") == "/etc/passwd"


def test_relative_paths_join_cwd(tmp_path):
    assert ev.normalise_path("a/../b.txt", cwd=str(tmp_path)) == os.path.join(os.path.realpath(tmp_path), "b.txt")


def test_symlink_resolves_to_what_it_points_at(tmp_path):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("key")
    link = tmp_path / "innocent.txt"
    link.symlink_to(secret)
    roots = ev.Roots.current(home=str(tmp_path / "home"), cwd=str(tmp_path / "elsewhere"))
    target = ev.portable_path(ev.normalise_path(link), roots)
    assert target == "${home}/.ssh/id_rsa"
    assert ev.target_class("fs.read", target) == "home.secret"


def test_bytes_and_pathlike_paths(tmp_path):
    assert ev.normalise_path(os.fsencode(tmp_path)) == ev.normalise_path(tmp_path) == os.path.realpath(tmp_path)


path_segment = st.text(alphabet="abcxyz._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


@given(st.lists(st.one_of(path_segment, st.just(".."), st.just(".")), max_size=8))
def test_normalised_paths_are_absolute_and_idempotent(parts):
    p = ev.normalise_path("/" + "/".join(parts))
    assert os.path.isabs(p)
    assert "/../" not in p + "/" and "/./" not in p + "/"
    assert ev.normalise_path(p) == p


@given(st.lists(path_segment, min_size=1, max_size=5))
def test_portable_paths_use_the_longest_root(parts):
    roots = ev.Roots(tmp="/t", home="/t/h", cwd="/w", site=("/py/lib/site",), stdlib="/py/lib", python="/py")
    rel = "/".join(parts)
    assert ev.portable_path(f"/t/h/{rel}", roots) == f"${{home}}/{rel}"
    assert ev.portable_path(f"/t/{rel}", roots) == (f"${{tmp}}/{rel}" if not rel.startswith("h/") and rel != "h" else f"${{home}}{rel[1:]}")
    assert ev.portable_path(f"/py/lib/site/{rel}", roots) == f"${{site}}/{rel}"
    assert ev.portable_path(f"/py/lib/{rel}", roots).startswith(("${stdlib}/", "${site}"))
    assert ev.portable_path(f"/tt/{rel}", roots) == f"/tt/{rel}"  # a prefix match must end at a slash


@pytest.mark.parametrize("path, cls", [
    ("${home}/.ssh/id_rsa", "home.secret"), ("${home}/.aws/credentials", "home.secret"),
    ("${home}/.bashrc", "home"), ("${home}/.config/app.toml", "home"), ("${tmp}/x", "tmp"),
    ("${cwd}/src/a.py", "cwd"), ("${site}/pkg/__init__.py", "site"), ("/etc/shadow", "system.secret"),
    ("/etc/hosts", "system"), ("/proc/self/environ", "proc.secret"), ("/proc/cpuinfo", "proc"),
    ("/dev/null", "dev"), ("/work/other", "other"),
])
def test_path_classes(path, cls):
    assert ev.path_class(path) == cls


# --------------------------------------------------------------------------- hosts and IPs

@pytest.mark.parametrize("spelling", [
    "127.0.0.1", "0x7f000001", "2130706433", "127.1", "0177.0.0.1", "::ffff:127.0.0.1", "[::ffff:7f00:1]",
])
def test_loopback_spellings_are_one_address(spelling):
    assert ev.canonical_ip(spelling) == "127.0.0.1"
    assert ev.host_class(ev.normalise_host(spelling)) == "loopback"


@pytest.mark.parametrize("host, expected", [
    ("Example.COM.", "example.com"), ("bücher.example", "xn--bcher-kva.example"),
    ("LOCALHOST", "localhost"), ("0xA9FEA9FE", "169.254.169.254"), ("::1", "::1"),
])
def test_host_normalisation(host, expected):
    assert ev.normalise_host(host) == expected


def test_metadata_endpoint_in_any_spelling_is_metadata():
    for spelling in ("169.254.169.254", "0xa9fea9fe", "2852039166", "::ffff:169.254.169.254"):
        assert ev.host_class(ev.normalise_host(spelling)) == "metadata_ip"


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_spelling_agrees(n):
    dotted = str(ipaddress.IPv4Address(n))
    for spelling in (str(n), hex(n), f"::ffff:{dotted}", dotted + "", dotted.upper()):
        assert ev.canonical_ip(spelling) == dotted
    assert ev.normalise_host(dotted + ".") == dotted


@given(st.ip_addresses(v=6))
def test_ipv6_canonical_and_mapped(ip):
    c = ev.canonical_ip(str(ip).upper())
    expected = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
    assert c == expected
    assert ev.canonical_ip(f"[{ip}]") == expected


label = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFXYZ0123456789-ü", min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.endswith("-"))


@settings(max_examples=200)
@given(st.lists(label, min_size=1, max_size=4), st.booleans())
def test_host_normalisation_is_idempotent_lowercase_ascii(labels, trailing_dot):
    host = ".".join(labels) + ("." if trailing_dot else "")
    n = ev.normalise_host(host)
    assert ev.normalise_host(n) == n
    assert not n.endswith(".")
    if ev.canonical_ip(n) is None and n.isascii():
        assert n == n.lower()


def test_anchored_host_class_does_not_confuse_lookalikes():
    assert ev.host_class("a.com.evil.net") == "domain"
    assert ev.host_class("localhost.evil.net") == "domain"
    assert ev.host_class("x.localhost") == "loopback"


def test_address_formatting_round_trips():
    assert ev.format_address("::1", 8080) == "[::1]:8080"
    assert ev.split_address("[::1]:8080") == ("::1", "8080")
    assert ev.format_address("Example.com.", None) == "example.com:*"
    assert ev.split_address("example.com:443") == ("example.com", "443")


# --------------------------------------------------------------------------- classes, tags, record

@pytest.mark.parametrize("category, target, detail, cls", [
    ("net.connect", "169.254.169.254:80", "tcp", "metadata_ip"),
    ("net.connect", "10.1.2.3:22", "tcp", "private_net"),
    ("net.connect", "8.8.8.8:53", "udp", "public_net"),
    ("net.connect", "pypi.org:443", "tcp", "domain"),
    ("net.connect", "${tmp}/sock", "unix", "unix"),
    ("net.bind", "0.0.0.0:0", "tcp", "unspecified"),
    ("env.read", "GITHUB_TOKEN", "", "env.secret"),
    ("env.read", "PATH", "", "env"),
    ("env.read", "PWD", "", "env"),
    ("proc.spawn", "${python}/bin/python3 -c 'x'", "", "python"),
    ("proc.spawn", "${tmp}/dropper --run", "", "tmp"),
    ("code.import", "json", "", "stdlib_module"),
    ("code.import", "requests", "", "module"),
    ("code.native", "libc.so.6", "", "system"),
    ("code.exec", "<string>", "", "string"),
    ("browser.request", "https://api.example.com/x", "", "domain"),
])
def test_target_class(category, target, detail, cls):
    assert ev.target_class(category, target, detail) == cls


def test_every_category_has_a_class_and_valid_tags():
    samples = {"fs": "${tmp}/x", "net": "127.0.0.1:1", "env": "HOME", "proc": "/bin/true",
               "code": "json", "sys": "settrace", "browser": "http://localhost/", "dom": "script",
               "syscall": "read"}
    for category in ev.CATEGORIES:
        cls = ev.target_class(category, samples[category.split(".")[0]])
        assert cls in ev.TARGET_CLASSES
        assert set(ev.observed_tags(category, cls)) <= set(ev.OBSERVED_TAGS)


def test_observed_tag_table():
    assert ev.observed_tags("net.connect", "public_net") == ("network_access", "external_api_call")
    assert ev.observed_tags("net.connect", "loopback") == ("network_access",)
    assert ev.observed_tags("fs.read", "home.secret") == ("file_read", "sensitive_data_access")
    assert ev.observed_tags("env.read", "env.secret") == ("sensitive_data_access", "env_access")
    assert ev.observed_tags("proc.spawn", "system") == ("process_spawn",)
    assert ev.observed_tags("code.import", "module") == ()


def test_event_rejects_values_outside_the_vocabulary():
    with pytest.raises(ValueError, match="category 'fs.steal'"):
        ev.Event(category="fs.steal", op="open", target="/x", target_class="other")
    with pytest.raises(ValueError, match="unknown tags"):
        ev.Event(category="fs.read", op="open", target="/x", target_class="other", tags=("evil",))
    with pytest.raises(ValueError, match="phase"):
        ev.Event(category="fs.read", op="open", target="/x", target_class="other", phase="lunch")


def test_resolver_agrees_on_numeric_spellings():
    # The C resolver is what a connect() really uses; our canonical form must match it.
    for spelling in ("0x7f000001", "2130706433", "127.1"):
        assert socket.inet_ntoa(socket.inet_aton(spelling)) == ev.canonical_ip(spelling)
