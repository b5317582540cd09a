"""Recipes for recording real test suites: how to install and run each one here.

Every recipe below was verified on this project's machine kind (2 cores, CPython
3.11.7 from pyenv, no internet except the package registries, running as root)
on 2026-11-29, following exactly these steps:

1. ``pip download --no-deps --no-binary :all: NAME==VERSION -d DL`` and extract
   the sdist; its root folder is ``NAME-VERSION`` (see ``sdist_dirname``).
2. ``python -m venv VENV`` then ``VENV/bin/python -m pip install
   *pip_install_args(recipe, SDIST_ROOT)`` (the sdist itself, with its extras,
   plus ``recipe.requirements``).
3. From inside SDIST_ROOT: ``VENV/bin/python -m pytest *pytest_argv(recipe)``.

How a ``Deselection.target`` becomes a pytest option (``pytest_argv`` does it):

* ``"k:EXPR"``: every test matching the ``-k`` expression EXPR is dropped; all
  k-targets of a recipe are folded into one ``-k "not (E1) and not (E2)"``.
* a path ending in ``/`` or ``.py`` (no ``::``): ``--ignore=PATH``.
* anything else: ``--deselect NODEID``.  pytest matches ``--deselect`` by
  *prefix*, and several recipes rely on that: ``...::test_bash[`` drops every
  parametrization of ``test_bash`` but not ``test_bash_clears_pythonhome``.

Counts in ``notes`` are pytest's own summary of the plain run (no tracer, no
PYTHONPATH), "deselected" includes what the project's own ``addopts`` deselect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deselection:
    target: str  # a pytest node id, or a path to --ignore (ends with / or .py), or a -k expression prefixed "k:"
    reason: str  # why it cannot run here, e.g. "needs internet (connects to httpbin.org)"


@dataclass(frozen=True)
class SuiteRecipe:
    name: str  # distribution name as on the index, lower case
    version: str
    requirements: tuple[str, ...]  # what to pip install besides the package itself (test deps), with pins where needed
    extras: tuple[str, ...] = ()  # extras of the package itself to install, e.g. ("tests",)
    test_paths: tuple[str, ...] = ("tests",)  # relative to the extracted sdist root
    pytest_args: tuple[str, ...] = ()  # extra flags the suite needs
    deselect: tuple[Deselection, ...] = ()
    install_from_source: bool = True  # install the extracted sdist itself (False: tests run against PYTHONPATH=src)
    notes: str = ""  # anything a maintainer must know

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def sdist_dirname(self) -> str:
        """Name of the folder the sdist extracts to (true for every recipe here)."""
        return f"{self.name}-{self.version}"


def pip_install_args(recipe: SuiteRecipe, sdist_root: str) -> list[str]:
    """Arguments for ``python -m pip install`` in a fresh venv."""
    target = sdist_root
    if recipe.extras:
        target += "[" + ",".join(recipe.extras) + "]"
    head = [target] if recipe.install_from_source else []
    return [*head, *recipe.requirements]


def pytest_argv(recipe: SuiteRecipe) -> list[str]:
    """Arguments for ``python -m pytest``, run from the extracted sdist root."""
    argv = [*recipe.test_paths, "-p", "no:cacheprovider", "-q", *recipe.pytest_args]
    keywords = []
    for d in recipe.deselect:
        if d.target.startswith("k:"):
            keywords.append(d.target[2:])
        elif "::" not in d.target and d.target.endswith(("/", ".py")):
            argv.append(f"--ignore={d.target}")
        else:
            argv += ["--deselect", d.target]
    if keywords:
        argv += ["-k", " and ".join(f"not ({k})" for k in keywords)]
    return argv


def _nodes(prefix: str, names: tuple[str, ...], reason: str) -> tuple[Deselection, ...]:
    return tuple(Deselection(f"{prefix}::{n}", reason) for n in names)


# --------------------------------------------------------------------------- urllib3 helpers
_URLLIB3_FORK = (
    "needs urllib3's patched hypercorn (a git fork, not on the package index): "
    "the dummy server reads scope['extensions']['tls'] / ['_transport']"
)
_URLLIB3_TUNNEL_TESTS = (  # CONNECT tunnels through dummyserver/asgi_proxy.py need the fork's _transport
    "TestHTTPProxyManager::test_basic_proxy",
    "TestHTTPProxyManager::test_https_proxy",  # prefix: also drops 4 test_https_proxy_* siblings
    "TestHTTPProxyManager::test_is_verified_http_proxy_to_https_target",
    "TestHTTPProxyManager::test_is_verified_https_proxy_to_https_target",
    "TestHTTPProxyManager::test_http_and_https_kwarg_ca_cert_data_proxy",
    "TestHTTPProxyManager::test_oldapi",
    "TestHTTPProxyManager::test_proxy_verified",
    "TestHTTPProxyManager::test_cross_protocol_redirect",
    "TestHTTPProxyManager::test_headers",
    "TestHTTPProxyManager::test_https_headers",  # prefix: also drops test_https_headers_forwarding_for_https
    "TestHTTPProxyManager::test_proxy_pooling",  # prefix: also drops test_proxy_pooling_ext
    "TestHTTPProxyManager::test_scheme_host_case_insensitive",
    "TestHTTPSProxyVerification::test_https_proxy_assert_fingerprint_md5",  # prefix: also drops *_non_matching
    "TestHTTPSProxyVerification::test_https_proxy_assert_hostname[",
    "TestHTTPSProxyVerification::test_https_proxy_ipv4_san",
    "TestHTTPSProxyVerification::test_https_proxy_ipv6_san",
    "TestHTTPSProxyVerification::test_https_proxy_no_san_hostname_checks_common_name",
)

# Not included: gitpython (3.2.1 and earlier): its MANIFEST.in excludes test/ from the sdist, and its
# suite needs a git clone of the GitPython repository itself (history, submodules) to run.
_RECIPES = (
    SuiteRecipe(
        name="attrs",
        version="26.1.0",
        requirements=("pytest", "hypothesis", "pympler", "cloudpickle"),
        deselect=(
            Deselection(
                "tests/test_converters.py::TestPipe::test_wrapped_annotation",
                "fails upstream on CPython 3.11 (pipe() loses the wrapped Converter's return annotation); "
                "not an environment problem",
            ),
        ),
        notes=(
            "Measured 2026-11-29 (plain run): 1376 passed, 0 failed, 8 skipped, 1 xfailed, 1 deselected; 22.3 s "
            "wall. Pure Python plus hypothesis; no network, no subprocess. Writes .hypothesis/ into the sdist "
            "root (cwd). tests/test_mypy.yml is not collected (needs pytest-mypy-plugins, runs mypy per case, "
            "very slow); the 3 pyright tests skip (pyright not installed). The project's addopts use "
            "--import-mode=importlib."
        ),
    ),
    SuiteRecipe(
        name="click",
        version="8.5.1",
        requirements=("pytest",),
        notes=(
            "Measured 2026-11-29 (plain run): 2434 passed, 0 failed, 24 skipped, 1 xfailed, 31000 deselected; "
            "10.0 s wall. All 31000 deselections come from the project's own addopts (-m 'not stress'). Spawns "
            "~84 subprocesses (pager tests run less/cat/head/sed, test_imports runs python); no network."
        ),
    ),
    SuiteRecipe(
        name="packaging",
        version="26.3",
        requirements=("pytest", "hypothesis", "pretend", "tomli_w"),
        notes=(
            "Measured 2026-11-29 (plain run): 62423 passed, 0 failed, 0 skipped, 427 deselected; 104.5 s wall. "
            "The 427 are the project's own opt-in property tests (addopts -m 'not property'). Heavily "
            "parametrized (most tests are tiny). Uses ctypes (CDLL(None) for glibc detection) and writes "
            ".hypothesis/ into the sdist root; no network. pip (already in the venv) is a test dependency."
        ),
    ),
    SuiteRecipe(
        name="jinja2",
        version="3.1.6",
        requirements=("pytest", "trio"),
        notes=(
            "Measured 2026-11-29 (plain run): 909 passed, 0 failed, 0 skipped; 4.8 s wall. Loads markupsafe's C "
            "extension; importing trio runs ctypes.util.find_library (spawns ldconfig, dlopens libpthread)."
        ),
    ),
    SuiteRecipe(
        name="markupsafe",
        version="3.0.4",
        requirements=("pytest",),
        notes=(
            "Measured 2026-11-29 (plain run): 79 passed, 0 failed, 1 skipped; 0.7 s wall. Installing from the "
            "sdist compiles the _speedups C extension (needs gcc, present here); the suite runs every test "
            "against both the native and the C implementation. Small but the C-extension case."
        ),
    ),
    SuiteRecipe(
        name="werkzeug",
        version="3.1.9",
        requirements=(
            "pytest",
            "pytest-timeout",
            "cffi",
            "cryptography",
            "ephemeral-port-reserve",
            # watchdog 7.x: test_reloader_sys_path[watchdog] hangs (reloader child busy-loops and
            # never reports the change); 6.0.0 passes it in ~3 s.
            "watchdog<7",
        ),
        pytest_args=("--timeout=120",),
        notes=(
            "Measured 2026-11-29 (plain run): 980 passed, 0 failed, 1 skipped; 20.7 s wall. Dev-server tests "
            "spawn ~25 python subprocesses (tests/live_apps/run.py) that serve HTTP/HTTPS on loopback ports "
            "reserved with ephemeral-port-reserve (bind/connect on 127.0.0.1) and on AF_UNIX sockets; includes "
            "the stat and watchdog reloaders. cryptography/cffi C extensions (ad-hoc TLS certs). --timeout=120 is"
            " only a guard against reloader hangs."
        ),
    ),
    SuiteRecipe(
        name="flask",
        version="3.1.3",
        requirements=(
            "pytest<9.1",  # tests/test_cli.py imports _pytest.monkeypatch.notset, gone in pytest 9.1
            "werkzeug<3.1.7",  # 3.1.7+ answers test_bad_environ_raises_bad_request with 404, test wants 400
            "asgiref",
            "greenlet",
            "python-dotenv",
        ),
        notes=(
            "Measured 2026-11-29 (plain run): 490 passed, 0 failed, 0 skipped; 4.2 s wall. In-process test client"
            " only: no sockets, no subprocesses; greenlet and markupsafe C extensions."
        ),
    ),
    SuiteRecipe(
        name="httpx",
        version="0.28.1",
        extras=("brotli", "cli", "http2", "socks", "zstd"),
        requirements=(
            "pytest<9.1",  # 9.1 changed caplog: test_logging_request/_redirect_chain also see uvicorn.access records
            "chardet==5.2.0",  # upstream's pin; chardet 6+/7 guesses other encodings in 5 autodetect tests
            "click<8.5",  # 8.5 deprecates CliRunner.isolated_filesystem -> DeprecationWarning is an error here
            "trio",
            "trustme",
            "uvicorn",
            "cryptography",
        ),
        deselect=(
            Deselection(
                "tests/test_timeouts.py::test_connect_timeout",
                "connects to 10.255.255.1 (private range, never a target here); marked @network upstream",
            ),
            Deselection(
                "tests/client/test_proxies.py::test_async_proxy_close",
                "needs internet (GET example.com through a proxy); marked @network upstream",
            ),
            Deselection(
                "tests/client/test_proxies.py::test_sync_proxy_close",
                "needs internet (GET example.com through a proxy); marked @network upstream",
            ),
            Deselection(
                "tests/test_timeouts.py::test_write_timeout[trio]",
                "flaky here (~50%): trio's async-generator finalizer emits a ResourceWarning depending on GC "
                "timing, which filterwarnings=error turns into a failure; the asyncio variant still runs",
            ),
        ),
        notes=(
            "Measured 2026-11-29 (plain run): 1411 passed, 0 failed, 1 skipped, 6 deselected; 15.8 s wall. A "
            "uvicorn server runs in a thread on the fixed address 127.0.0.1:8000 (two httpx runs cannot overlap);"
            " ~77 loopback connects, asyncio and trio backends. C extensions: brotli, zstandard, cryptography. "
            "test_load_ssl_with_keylog makes OpenSSL create a file named 'test' in the sdist root. The "
            "deselections are exactly upstream's @pytest.mark.network tests plus one flaky trio case."
        ),
    ),
    SuiteRecipe(
        name="urllib3",
        version="2.8.0",
        extras=("brotli", "zstd", "socks", "h2"),
        requirements=(
            "pytest",
            "pytest-timeout",
            "pytest-socket",
            "anyio[trio]",
            "trio",
            "h2",
            "httpx",
            "hypercorn",
            "quart",
            "quart-trio",
            "pysocks",
            "cryptography",
            "idna",
            "pyopenssl",
            "trustme",
        ),
        test_paths=("test",),
        # requires_network tests connect to TARPIT_HOST 240.0.0.0 (non-loopback): the project's own marker.
        pytest_args=("-m", "not requires_network", "--timeout=60"),
        deselect=(
            Deselection("test/contrib/emscripten/", "needs pyodide/node/a browser (emscripten backend)"),
            *_nodes(
                "test/with_dummyserver/test_connectionpool.py::TestConnectionPoolTimeouts",
                ("test_connect_timeout", "test_total_applies_connect", "test_create_connection_timeout"),
                "connects to TARPIT_HOST 240.0.0.0 (non-loopback), not marked requires_network",
            ),
            Deselection(
                "k:test_http2_probe_no_result_in_connect_error or test_http2_probe_blocked_per_thread",
                "connects to TARPIT_HOST 240.0.0.0 (non-loopback), not marked requires_network",
            ),
            Deselection(
                "test/with_dummyserver/test_connectionpool.py::TestConnectionPool::"
                "test_source_address_error[invalid_source_address0-False]",
                "this machine's own eth0 is in 192.0.2.0/24, so the 'invalid' source 192.0.2.255 binds fine",
            ),
            Deselection(
                "k:test_client_intermediate or test_client_key_password or test_alpn_default"
                " or test_http2_probe_result_is_cached",
                _URLLIB3_FORK,
            ),
            *_nodes("test/with_dummyserver/test_proxy_poolmanager.py", _URLLIB3_TUNNEL_TESTS, _URLLIB3_FORK),
        ),
        notes=(
            "Measured 2026-11-29 (plain run): 2296 passed, 0 failed, 275 skipped, 4 xfailed, 134 deselected; 35.8"
            " s wall. Busiest loopback suite: hypercorn/quart-trio dummy servers in threads plus raw socket "
            "servers (~330 binds, ~790 connects on 127.0.0.1/::1), HTTP/1.1, HTTP/2, TLS, SOCKS. Also ~20 "
            "getaddrinfo calls for non-local names (e.g. 'localhost.'), which only reach the resolver. Skips: 212"
            " need TLSv1/1.1, the rest IPv6-on-loopback, 'localhost.' FQDN, --integration. PyPI's hypercorn is "
            "used instead of upstream's git fork; the tests that need the fork are deselected. C extensions: "
            "brotli, backports.zstd, cryptography."
        ),
    ),
    SuiteRecipe(
        name="requests",
        version="2.34.2",
        extras=("socks",),
        requirements=("pytest", "pytest-httpbin==2.1.0", "httpbin~=0.10.0", "trustme"),
        deselect=(
            Deselection(
                "tests/test_requests.py::TestTimeout::test_connect_timeout",
                "connects to TARPIT 10.255.255.1 (private range, never a target here)",
            ),
            Deselection(
                "tests/test_requests.py::TestTimeout::test_total_timeout_connect",
                "connects to TARPIT 10.255.255.1 (private range, never a target here)",
            ),
        ),
        notes=(
            "Measured 2026-11-29 (plain run): 613 passed, 0 failed, 15 skipped, 1 xfailed, 4 deselected; 75.5 s "
            "wall. pytest-httpbin serves httpbin (HTTP and HTTPS) from threads on loopback (~37 binds, ~320 "
            "connects); tests/testserver adds raw socket servers. No subprocesses. Builds with setuptools (a "
            "build/ folder appears in the sdist root). 12 skips are Windows-only."
        ),
    ),
    SuiteRecipe(
        name="virtualenv",
        version="21.15.6",
        requirements=(
            "pytest",
            "pytest-env",
            "pytest-mock",
            "pytest-timeout",
            "setuptools",
            "time-machine",
            "packaging",
        ),
        deselect=(
            Deselection(
                "k:test_activator_prompt_stays_data and bash and "
                "(substitution or expansion or dollar or quote or breakout or placeholder)",
                "runs as root: bash draws the activator's escaped \\$ in PS1 as '#', so every prompt payload "
                "containing '$' mismatches (448 fail; the k-expression also drops 64 passing siblings)",
            ),
            Deselection(
                "tests/unit/activation/test_bash.py::test_bash[",
                "runs as root: same PS1 '\\$' -> '#' rendering breaks the prompt assertion",
            ),
            Deselection(
                "tests/unit/create/test_creator.py::test_creator_replaces_generated_file_links[_virtualenv",
                "machine quirk: pyenv's python3.9 shim is on PATH but not activated (exits 127)",
            ),
            Deselection(
                "k:test_seed_link_via_app_data or test_create_distutils_cfg",
                "pip inside the new env contacts the package index (non-loopback); 12-18 s each",
            ),
            Deselection(
                "k:test_console_script_preserves_interpreter_path and not plain",
                "time: 22 near-identical ~4 s parametrizations; the two '-plain' cases still run",
            ),
            Deselection(
                "k:test_pip_launcher_record_matches_contents and not plain",
                "time: ~4 s per parametrization; the 'plain' case still runs",
            ),
            Deselection(
                "k:test_pip_reseed",
                "time: 7 tests, ~45 s of pip re-seeding; test_pip_invoke's other tests cover the same path",
            ),
        ),
        notes=(
            "Measured 2026-11-29 (plain run): 1194 passed, 0 failed, 851 skipped, 593 deselected; 196.3 s wall "
            "(about 3.3 min, the slowest suite). 21.15.6 is the newest sdist that builds from the index: "
            "21.15.7-21.15.11 need the build plugin python-sbom, which the index does not have. The suite spawns "
            "~1400 subprocesses (~800 of them Python: new venvs, pip, interpreter discovery that runs every pyenv"
            " python, bash/dash activation scripts, tar, uname) and compiles a C extension (test_build_c_ext). It"
            " writes to HOME: ~/.cache/virtualenv/py_info. Skips: zsh/tcsh/fish/nushell/pwsh/xonsh are not "
            "installed (~570), Windows-only batch activation (90), and tests/integration needs --int (slow, not "
            "run). Three k: deselections only save time (from ~7 min to ~3.3 min)."
        ),
    ),
)

SUITES: dict[str, SuiteRecipe] = {r.name: r for r in _RECIPES}


# Suites that ship inside sandhop instead of coming from the package index (recorded with
# `sandhop record NAME==VERSION --source DIR`): name -> (version, folder under sandhop.datasets).
LOCAL_SUITES: dict[str, tuple[str, str]] = {
    "webshop": ("1", "webshop"),  # the browser suite: a web shop and its Playwright tests
}
