"""The policy language: rules, their grammar, and how a target pattern is compiled.

A policy is a text file with one rule per line, in the spirit of Deno's permission flags:

    # comment
    extends  medium                       # start from another policy's rules and default
    default  deny                         # the effect when no rule matches
    allow    fs.write     ${tmp}/**
    redirect fs.write     ${home}/**          ${tmp}/sandhop-overlay
    deny     fs.read      @home.secret
    allow    net.connect  *.pypi.org:443
    deny     net.connect  metadata_ip:*
    allow    proc.spawn   git

Patterns are matched against *normalised, portable* targets (what `events.py` produces), never
against a spelling, so a pattern is normalised the same way when it is compiled: hosts are
lower-cased, IDNA-encoded and stripped of a trailing dot, IP literals canonical, absolute paths
rewritten with the machine's `${...}` variables. `@class` matches the event's target class (the
one `events.target_class`), which is how tiers name secrets and persistence places portably.
Pure: parsing needs no I/O beyond reading the file, compiling only the `Roots` it is given.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sandhop.enforcement import events as ev

EFFECTS: tuple[str, ...] = ("allow", "deny", "redirect")
VARIABLES: tuple[str, ...] = ("tmp", "cwd", "home", "site", "stdlib", "python")
# Host classes usable as bare words in network patterns (`loopback:*`).
HOST_CLASSES: tuple[str, ...] = ("loopback", "private_net", "link_local", "metadata_ip", "public_net",
                                 "multicast", "unspecified", "domain")
_FAMILIES = sorted({c.split(".", 1)[0] for c in ev.CATEGORIES})
_NET_CATEGORIES = frozenset({"net.connect", "net.bind", "net.send"})
_PATH_CATEGORIES = frozenset({"fs.read", "fs.write", "fs.delete", "fs.meta"})
_VAR_RE = re.compile(r"\$\{([^}]*)\}")

Matcher = Callable[[str, str], bool]  # (target, target_class) -> matches


class PolicyError(ValueError):
    """A policy file or rule that cannot be used; says where and what was expected."""

    def __init__(self, source: str, line: int, column: int, message: str, text: str = "") -> None:
        self.source, self.line, self.column, self.text = source, line, column, text
        where = f"{source}:{line}:{column}" if line else source
        caret = f"\n    {text}\n    {' ' * max(column - 1, 0)}^" if text else ""
        super().__init__(f"{where}: {message}{caret}")


@dataclass(frozen=True)
class Rule:
    """One parsed rule. `rule_id` is `<policy>:<line>` so a decision names the line that made it."""

    effect: str
    category: str          # a category, `family.*` or `*`
    pattern: str           # as written
    redirect_to: str = ""
    rule_id: str = ""
    text: str = ""         # the whole rule as written, for messages
    categories: frozenset[str] = field(default=frozenset(), compare=False)
    match: Matcher = field(default=lambda t, c: False, compare=False, repr=False)


@dataclass(frozen=True)
class Policy:
    """A named rule list with a default effect (a tier template or a user's policy file)."""

    name: str
    default: str
    rules: tuple[Rule, ...]
    source: str = ""
    extends: str = ""


# --------------------------------------------------------------------------- parsing

def parse_policy(text: str, *, name: str, source: str = "", roots: ev.Roots,
                 resolve: Callable[[str], "Policy"] | None = None) -> Policy:
    """Parse policy text. `resolve` loads the policy named by an `extends` line (a tier name, or a
    file path relative to the file that extends it)."""
    source = source or name
    default = ""
    base: Policy | None = None
    rules: list[Rule] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line.strip():
            continue
        words = _split_words(line)
        head, col = words[0]
        if head == "default":
            if len(words) != 2 or words[1][0] not in ("allow", "deny"):
                col = words[1][1] if len(words) > 1 else len(line) + 1
                raise PolicyError(source, lineno, col, "expected `default allow` or `default deny`", raw)
            default = words[1][0]
            continue
        if head == "extends":
            if len(words) != 2:
                raise PolicyError(source, lineno, col, "expected `extends NAME` (a tier or a policy file)", raw)
            if rules or base is not None:
                raise PolicyError(source, lineno, col, "`extends` must come before the first rule", raw)
            if resolve is None:
                raise PolicyError(source, lineno, col, "`extends` is not available here", raw)
            try:
                base = resolve(words[1][0])
            except (PolicyError, OSError, KeyError, RecursionError) as exc:
                raise PolicyError(source, lineno, words[1][1], f"cannot extend {words[1][0]!r}: {exc}", raw) from exc
            continue
        rules.append(parse_rule_words(words, roots=roots, source=source, lineno=lineno, raw=raw,
                                      rule_id=f"{name}:{lineno}"))
    if not default:
        if base is None:
            raise PolicyError(source, 0, 0, "no `default allow|deny` line and no `extends`: "
                              "say what happens when no rule matches")
        default = base.default
    all_rules = (base.rules if base else ()) + tuple(rules)
    return Policy(name=name, default=default, rules=all_rules, source=source,
                  extends=base.name if base else "")


def parse_rule(text: str, *, roots: ev.Roots, source: str = "rule", rule_id: str = "",
               effect: str | None = None) -> Rule:
    """Parse one rule line; with `effect` given, the line omits it (`net.connect example.com:443`)."""
    line = _strip_comment(text)
    words = _split_words(line)
    if effect is not None:
        words = [(effect, 0)] + words
    if not words or (effect is not None and len(words) == 1):
        raise PolicyError(source, 1, 1, "empty rule: expected `CATEGORY PATTERN`", text)
    if effect is not None and len(words) == 2:  # a bare category grants or revokes all of it
        words.append(("*", len(line) + 1))
    return parse_rule_words(words, roots=roots, source=source, lineno=1, raw=text,
                            rule_id=rule_id or f"{source}")


def parse_rule_words(words: list[tuple[str, int]], *, roots: ev.Roots, source: str, lineno: int,
                     raw: str, rule_id: str) -> Rule:
    effect, col = words[0]
    if effect not in EFFECTS:
        raise PolicyError(source, lineno, col, f"expected an effect ({', '.join(EFFECTS)}) or "
                          f"`default`/`extends`, found {effect!r}", raw)
    if len(words) < 3:
        col = words[-1][1] + len(words[-1][0]) + 1
        what = "a category" if len(words) < 2 else "a target pattern"
        raise PolicyError(source, lineno, col, f"expected {what}: `{effect} CATEGORY PATTERN"
                          f"{' REDIRECT-TO' if effect == 'redirect' else ''}`", raw)
    category, ccol = words[1]
    categories = _categories(category)
    if not categories:
        raise PolicyError(source, lineno, ccol, f"unknown category {category!r}; expected one of "
                          f"{', '.join(ev.CATEGORIES)}, a family such as `fs.*`, or `*`", raw)
    pattern, pcol = words[2]
    if effect == "redirect":
        if len(words) != 4:
            col = words[4][1] if len(words) > 4 else len(raw.rstrip()) + 1
            raise PolicyError(source, lineno, col, "a redirect needs exactly one destination: "
                              "`redirect CATEGORY PATTERN DESTINATION`", raw)
        redirect_to, rcol = words[3]
        _check_variables(redirect_to, source, lineno, rcol, raw)
    else:
        if len(words) > 3:
            raise PolicyError(source, lineno, words[3][1], f"unexpected {words[3][0]!r}: only a "
                              "redirect takes a destination", raw)
        redirect_to = ""
    try:
        match = compile_pattern(pattern, categories, roots)
    except _PatternError as exc:
        raise PolicyError(source, lineno, pcol + exc.offset, str(exc), raw) from None
    text = " ".join(w for w, _ in words)
    return Rule(effect=effect, category=category, pattern=pattern, redirect_to=redirect_to,
                rule_id=rule_id, text=text, categories=categories, match=match)


def _strip_comment(line: str) -> str:
    # `#` starts a comment at the line start or after whitespace (a URL fragment is not one).
    m = re.search(r"(^|\s)#", line)
    return line[:m.start()] if m else line


def _split_words(line: str) -> list[tuple[str, int]]:
    return [(m.group(), m.start() + 1) for m in re.finditer(r"\S+", line)]


def _categories(spec: str) -> frozenset[str]:
    if spec == "*":
        return frozenset(ev.CATEGORIES)
    if spec.endswith(".*") and spec[:-2] in _FAMILIES:
        return frozenset(c for c in ev.CATEGORIES if c == spec[:-2] or c.startswith(spec[:-1]))
    return frozenset({spec}) if spec in ev.CATEGORIES else frozenset()


def _check_variables(text: str, source: str, lineno: int, col: int, raw: str) -> None:
    for m in _VAR_RE.finditer(text):
        if m.group(1) not in VARIABLES:
            raise PolicyError(source, lineno, col + m.start(), f"unknown variable ${{{m.group(1)}}}; "
                              f"expected one of {', '.join('${%s}' % v for v in VARIABLES)}", raw)


# --------------------------------------------------------------------------- compiling

class _PatternError(Exception):
    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


def compile_pattern(pattern: str, categories: frozenset[str], roots: ev.Roots) -> Matcher:
    """A predicate over (normalised target, target class) for the given categories."""
    if pattern == "*":
        return lambda t, c: True
    if pattern.startswith("@"):
        cls = pattern[1:]
        if cls not in ev.TARGET_CLASSES:
            raise _PatternError(f"unknown target class {cls!r}; expected one of {', '.join(ev.TARGET_CLASSES)}", 1)
        return lambda t, c: c == cls
    matchers = {}
    for category in sorted(categories):
        kind = _kind(category)
        if kind not in matchers:
            try:
                matchers[kind] = _COMPILERS[kind](pattern, roots)
            except _PatternError as exc:
                if len(categories) == 1:
                    raise
                raise _PatternError(f"{exc} (for {category}: a rule over several categories needs a "
                                    "pattern that fits each; name one category or family instead)",
                                    exc.offset) from None
    if len(matchers) == 1:
        return next(iter(matchers.values()))
    by_category = {c: matchers[_kind(c)] for c in categories}
    # A rule over several families (`*`, `net.*`) needs the category: keep it in the closure.
    return _MultiMatcher(by_category)


class _MultiMatcher:
    """For rules spanning families; the engine passes the category through `for_category`."""

    def __init__(self, by_category: dict[str, Matcher]) -> None:
        self.by_category = by_category

    def __call__(self, target: str, cls: str) -> bool:  # pragma: no cover - engine specialises
        return any(m(target, cls) for m in self.by_category.values())


def specialise(rule: Rule, category: str) -> Matcher:
    """The matcher of `rule` for one category (the engine compiles per category)."""
    m = rule.match
    return m.by_category[category] if isinstance(m, _MultiMatcher) else m


def _kind(category: str) -> str:
    if category in _PATH_CATEGORIES:
        return "path"
    if category in _NET_CATEGORIES:
        return "address"
    if category in ("net.dns",):
        return "host"
    if category == "browser.request":
        return "url"
    if category == "proc.spawn":
        return "exe"
    if category == "code.import":
        return "module"
    if category == "code.native":
        return "native"
    return "name"  # env.*, code.exec, proc.signal, sys.tamper, dom.mutation


def glob_regex(glob: str) -> str:
    """Path glob to regex: `**` crosses `/`, `*` and `?` do not, `[..]` is a set."""
    out, i = [], 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("/**", i) and (i + 3 == len(glob)):
            out.append("(?:/.*)?")  # `dir/**` also matches `dir` itself
            i += 3
        elif glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[":
            end = glob.find("]", i + 2)
            if end < 0:
                raise _PatternError("unclosed `[` in pattern", i)
            body = glob[i + 1:end]
            negate = body.startswith("!")
            inner = "".join("-" if ch == "-" else re.escape(ch) for ch in (body[1:] if negate else body))
            out.append("[" + ("^" if negate else "") + inner + "]")
            i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def _real_head(pattern: str) -> str:
    """An absolute pattern with its literal leading folders resolved as targets are (real paths:
    `/bin/curl` on a merged-usr system is `/usr/bin/curl`)."""
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    head = literal.rsplit("/", 1)[0] if literal != pattern else pattern
    if not head or head == "/":
        return pattern
    return os.path.realpath(head) + pattern[len(head):]


def _compile_path(pattern: str, roots: ev.Roots) -> Matcher:
    """Patterns with a variable (or `~`) match the portable target as stored; an absolute pattern
    matches the target with its variable expanded to this machine's roots, so `/home/**` also
    covers `${home}/...` and `/bin/curl` covers `/usr/bin/curl`."""
    _check_pattern_variables(pattern)
    if not (pattern.startswith(("/", "${", "~", "*"))):
        raise _PatternError("a path pattern must be absolute, start with a variable such as ${tmp}, "
                            "`~/`, `**/`, or be `@class` / `*`")
    if pattern.startswith("~/") or pattern == "~":
        pattern = "${home}" + pattern[1:]
    if not pattern.startswith("/"):
        regex = re.compile(glob_regex(pattern) + r"\Z", re.DOTALL)
        return lambda t, c: regex.match(t) is not None
    regex = re.compile(glob_regex(_real_head(pattern)) + r"\Z", re.DOTALL)
    expansions: dict[str, list[str]] = {}
    for prefix, var in roots.prefixes():
        expansions.setdefault(var[2:-1], []).append(prefix)

    def match(t: str, c: str) -> bool:
        if t.startswith("${"):
            var, _, rest = t[2:].partition("}")
            return any(regex.match(prefix + rest) is not None for prefix in expansions.get(var, ()))
        return regex.match(t) is not None
    return match


def _check_pattern_variables(pattern: str) -> None:
    for m in _VAR_RE.finditer(pattern):
        if m.group(1) not in VARIABLES:
            raise _PatternError(f"unknown variable ${{{m.group(1)}}}; expected one of "
                                f"{', '.join('${%s}' % v for v in VARIABLES)}", m.start())


def _compile_name(pattern: str, roots: ev.Roots) -> Matcher:
    regex = re.compile(_name_regex(pattern) + r"\Z", re.DOTALL)
    return lambda t, c: regex.match(t) is not None


def _name_regex(pattern: str) -> str:
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


def _compile_module(pattern: str, roots: ev.Roots) -> Matcher:
    # `pkg` is the package alone; `pkg.*` its submodules; `pkg**` both.
    return _compile_name(pattern, roots)


def _compile_exe(pattern: str, roots: ev.Roots) -> Matcher:
    """proc.spawn: a pattern with a `/` or a variable matches the executable's path; a bare name
    matches its base name wherever it lives (a name rule is about the tool, not its place)."""
    by_path = "/" in pattern or pattern.startswith(("${", "~"))
    inner = _compile_path(pattern, roots) if by_path else _compile_name(pattern, roots)

    def match(target: str, cls: str) -> bool:
        exe = executable_of(target)
        return inner(exe if by_path else exe.rsplit("/", 1)[-1], cls)
    return match


def executable_of(spawn_target: str) -> str:
    """The executable of a proc.spawn target (a shell-quoted argv)."""
    try:
        return shlex.split(spawn_target)[0]
    except (ValueError, IndexError):
        return spawn_target.split(" ", 1)[0]


def _compile_native(pattern: str, roots: ev.Roots) -> Matcher:
    if pattern.startswith(("/", "${", "~", "**")):
        return _compile_path(pattern, roots)
    return _compile_name(pattern, roots)  # a library name such as `libc.so.6`


@dataclass(frozen=True)
class HostPattern:
    """The host half of a network pattern."""

    kind: str            # any | class | suffix | exact | network
    value: object = None

    def matches(self, host: str, cls: str) -> bool:
        k = self.kind
        if k == "any":
            return True
        if k == "class":
            return cls == self.value
        if k == "suffix":
            return host.endswith(self.value)  # value starts with "." so the match is anchored
        if k == "exact":
            return host == self.value
        ip = ev.canonical_ip(host)
        return ip is not None and ipaddress.ip_address(ip) in self.value


def parse_host(text: str) -> HostPattern:
    h = text.strip()
    if h in ("", "*"):
        return HostPattern("any")
    if h in HOST_CLASSES:
        return HostPattern("class", h)
    if h.startswith("@") and h[1:] in HOST_CLASSES + ("unix",):
        return HostPattern("class", h[1:])
    if "/" in h:
        try:
            return HostPattern("network", ipaddress.ip_network(h.strip("[]"), strict=False))
        except ValueError:
            raise _PatternError(f"{h!r} is not a CIDR network such as 10.0.0.0/8") from None
    if h.startswith("*."):
        rest = ev.normalise_host(h[2:])
        if not rest or "*" in rest:
            raise _PatternError("`*.` must be followed by a domain, as in `*.example.com`")
        return HostPattern("suffix", "." + rest)
    if "*" in h:
        raise _PatternError("a host pattern may use `*` only as a whole label prefix (`*.example.com`)")
    return HostPattern("exact", ev.normalise_host(h))


def parse_ports(text: str) -> tuple[int, int] | None:
    """(low, high) inclusive, or None for any port."""
    if text in ("", "*"):
        return None
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise _PatternError(f"expected a port, a range such as 8000-8999, or `*`; found {text!r}")
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    if not (0 <= low <= high <= 65535):
        raise _PatternError(f"port range {text!r} is outside 0-65535")
    return low, high


def _split_host_port(pattern: str) -> tuple[str, str]:
    if pattern.startswith("["):
        host, sep, rest = pattern[1:].partition("]")
        if not sep:
            raise _PatternError("unclosed `[` in an IPv6 host")
        return host, rest[1:] if rest.startswith(":") else rest
    if pattern.count(":") > 1 and "/" not in pattern.split(":")[-1]:
        raise _PatternError("write IPv6 hosts in brackets: [::1]:8080")
    host, sep, port = pattern.rpartition(":")
    return (host, port) if sep else (pattern, "*")


def _compile_address(pattern: str, roots: ev.Roots) -> Matcher:
    if pattern.startswith("unix:"):
        inner = pattern[5:]
        if inner.startswith("@"):
            rx = re.compile(_name_regex(inner) + r"\Z")
            return lambda t, c: c == "unix" and rx.match(t) is not None
        try:
            path = _compile_path(inner, roots)
        except _PatternError as exc:
            raise _PatternError(str(exc), exc.offset + len("unix:")) from None
        return lambda t, c: c == "unix" and path(t, c)
    host_text, port_text = _split_host_port(pattern)
    host = parse_host(host_text)
    ports = parse_ports(port_text)

    def match(target: str, cls: str) -> bool:
        if cls == "unix":
            return host.kind == "any" and ports is None
        h, p = ev.split_address(target)
        if ports is not None:
            if not p.isdigit() or not (ports[0] <= int(p) <= ports[1]):
                return False
        return host.matches(h, cls)
    return match


def _compile_host(pattern: str, roots: ev.Roots) -> Matcher:
    # A lookup has no port: `net.* metadata_ip:*` covers net.dns through its host half.
    if pattern.startswith("[") or (":" in pattern and pattern.count(":") == 1):
        pattern = _split_host_port(pattern)[0]
    host = parse_host(pattern)
    return lambda t, c: host.matches(t, c)


def _compile_url(pattern: str, roots: ev.Roots) -> Matcher:
    """browser.request: the same host[:port] pattern, matched on the URL's host and port."""
    address = _compile_address(pattern, roots)

    def match(target: str, cls: str) -> bool:
        from urllib.parse import urlsplit
        try:
            u = urlsplit(target)
            port = u.port or {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(u.scheme, "")
            host = ev.normalise_host(u.hostname or "")
        except ValueError:
            return False
        return address(ev.format_address(host, port) if host else "", cls)
    return match


_COMPILERS: dict[str, Callable[[str, ev.Roots], Matcher]] = {
    "path": _compile_path, "address": _compile_address, "host": _compile_host, "url": _compile_url,
    "exe": _compile_exe, "module": _compile_module, "native": _compile_native, "name": _compile_name,
}


# --------------------------------------------------------------------------- files

TIERS_DIR = Path(__file__).resolve().parent / "tiers"


def read_policy_file(path: str | os.PathLike, *, roots: ev.Roots,
                     resolve: Callable[[str], Policy] | None = None, name: str | None = None) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(p), 0, 0, f"not UTF-8 text ({exc}); save the policy as UTF-8") from exc
    return parse_policy(text, name=name or p.stem, source=str(p), roots=roots, resolve=resolve)
