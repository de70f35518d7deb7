"""The package installs under one `parley` namespace and exposes one console script."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from importlib.metadata import version


PACKAGES = ("protocol", "relay", "client", "state", "conformance")


def test_subpackages_live_under_parley_only(tmp_path):
    for name in PACKAGES:
        assert importlib.util.find_spec(f"parley.{name}") is not None
    # From a directory outside the checkout, no bare top-level package exists.
    probe = "import importlib.util, sys; sys.exit(sum(importlib.util.find_spec(n) is not None for n in sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", probe, *PACKAGES], cwd=tmp_path, timeout=30)
    assert result.returncode == 0, "a bare relay/client/... package is importable"


def _parley():
    script = shutil.which("parley", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "the 'parley' console script is not installed"
    return script


def test_console_script_version_and_help():
    out = subprocess.run([_parley(), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and version("parley") in out.stdout
    out = subprocess.run([_parley(), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Usage: parley" in out.stdout


# --- the installed package holds what users run; test tooling stays in the checkout ----------

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
# Modules that drive processes or fake the relay's clock for tests; they live in tests/support.
TOOLING = {"childproc", "coreharness", "fakerelay", "golang", "harness", "matrix", "nodepeer", "parleyproc",
           "redisproc", "relaycli", "relayproc", "testing", "support", "tlscert"}


def _configured_packages() -> dict[str, str]:
    """pyproject's packages, each with the checkout directory it installs from."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    return {name: config["package-dir"][name] for name in config["packages"]}


def test_package_list_is_the_product_and_test_tooling_is_not_in_it():
    packages = _configured_packages()
    # relay/cluster (issue #14: the backplane) installs as parley.relay.cluster.
    assert set(packages) == {f"parley.{name}" for name in PACKAGES} | {"parley.conformance.relay_suite",
                                                                       "parley.relay.cluster"}
    # Every Python package directory of the checkout is installed, except the test tooling.
    skip = {".venv", ".git", "node_modules", "build", "dist", "tests", "bench"}
    found = {
        str(init.parent.relative_to(REPO))
        for init in REPO.rglob("__init__.py")
        if not skip & set(init.relative_to(REPO).parts)
    }
    assert found == set(packages.values()), found ^ set(packages.values())
    assert (REPO / "tests" / "support" / "__init__.py").is_file()
    for directory in packages.values():
        names = {path.stem for path in (REPO / directory).glob("*.py")}
        assert not names & TOOLING, (directory, names & TOOLING)


def test_wheel_holds_no_test_tooling_and_its_conformance_command_runs(tmp_path):
    """Build the wheel from a copy of the checkout, list it, and run what it installs on its own."""
    import sysconfig
    import zipfile

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "node_modules", "build", "dist", "*.egg-info", "__pycache__",
                                    ".hypothesis")
    shutil.copytree(REPO, src, ignore=ignore)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp_path / "whl")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("parley-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert all(n.startswith("parley/") for n in modules), modules
    assert {n.rpartition("/")[0].replace("/", ".") for n in modules} == set(_configured_packages())
    assert not {n.rpartition("/")[2][:-3] for n in modules} & TOOLING, modules
    assert "parley/conformance/cli.py" in names and "parley/conformance/relay_suite/plugin.py" in names

    # Installed alone (no site hooks, so the checkout's editable parley is out of sight; the
    # dependencies come from this environment's site-packages), every module imports and
    # `parley conformance relay` finds its suite inside the install.
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}"}
    dotted = [m[:-3].replace("/", ".").removesuffix(".__init__") for m in modules]
    probe = (
        "import importlib, importlib.util, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(%r), module.__file__\n"
        "assert importlib.util.find_spec('support') is None\n" % str(site)
    )
    out = subprocess.run([sys.executable, "-S", "-c", probe, *dotted], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    # An unreachable relay is a usage error (exit 4) found by the suite's plugin after collecting.
    out = subprocess.run([sys.executable, "-S", "-m", "parley.client", "conformance", "relay", "ws://127.0.0.1:9/"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cannot open a WebSocket to ws://127.0.0.1:9/" in out.stdout + out.stderr


def test_client_import_stack_is_at_most_six_deep():
    """Issue #13: the client's modules import each other at most six deep (`bench/importdepth.py`)."""
    spec = importlib.util.spec_from_file_location("importdepth", REPO / "bench" / "importdepth.py")
    importdepth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(importdepth)
    chain = importdepth.longest_chain(importdepth.import_graph(REPO / "client"))
    assert len(chain) - 1 <= 6, " -> ".join(chain)
