"""A real, non-editable `pip install .` ships the twistd plugins and the `relay` command.

Running from the checkout would find twisted/plugins through the source tree and prove
nothing, so the check installs into a fresh venv and runs its twistd from outside the tree.
The fresh venv borrows the test venv's dependencies (a .pth line) to stay offline and fast;
.pth files inside that borrowed directory are not processed, so the editable install of
this checkout there cannot leak in.
"""

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__", ".*cache", "relay-state"),
    )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    )
    purelib.mkdir(parents=True, exist_ok=True)
    borrowed = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "borrowed-deps.pth").write_text("\n".join(borrowed) + "\n")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
            "--quiet", "--disable-pip-version-check", "--no-deps", "--no-build-isolation", str(src),
        ],
        check=True,
        cwd=work,
    )
    return venv


# twistd's own script belongs to Twisted, which the fresh venv borrows rather than installs;
# this is exactly what that script runs.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    if args[0] == "twistd":
        command = [str(venv / "bin" / "python"), "-c", TWISTD, *args[1:]]
    else:
        command = [str(venv / "bin" / args[0]), *args[1:]]
    return subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=60)


def test_wheel_ships_plugins_without_an_init(installed):
    plugins = list(installed.glob("lib/python*/site-packages/twisted/plugins"))
    assert plugins, "twisted/plugins was not installed"
    assert (plugins[0] / "relay_plugins.py").exists()
    ours = plugins[0] / "__init__.py"
    assert not ours.exists(), "our twisted/plugins must not ship an __init__.py"


def test_installed_twistd_lists_both_plugins(installed):
    result = run(installed, "twistd", "--help")
    assert result.returncode == 0, result.stderr
    assert "relay-server" in result.stdout
    assert "relay-agent" in result.stdout


@pytest.mark.parametrize("plugin", ["relay-server", "relay-agent"])
def test_installed_plugin_help(installed, plugin):
    result = run(installed, "twistd", plugin, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_installed_relay_command(installed):
    result = run(installed, "relay", "--help")
    assert result.returncode == 0, result.stderr
    assert "agent-token" in result.stdout
