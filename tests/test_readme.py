"""The README's two quickstart commands, and .ci/run running exactly the test one."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", text)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    cmd = readme_command("test-command")
    out = subprocess.run(["awk", '/<!-- test-command -->/{getline; getline; print; exit}', str(ROOT / "README.md")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "awk '/<!-- test-command -->/" in ci and 'bash -c "$cmd"' in ci
    # nothing hidden beside it: .ci/run has no other commands
    body = [ln for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert all(re.match(r"(set |cd |cmd=|if |  echo|  exit|fi|echo \"\+|bash -c)", ln) for ln in body), body


def test_readme_main_command_runs_the_demo():
    cmd = readme_command("main-command")
    assert "pip install" in cmd and "mmrwkv demo" in cmd


@pytest.mark.slow
def test_readme_commands_from_a_fresh_clone(tmp_path):
    """Fresh clone + fresh venv, exactly as a newcomer (and .ci/run) would; several minutes."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST"))}
    r = subprocess.run(["bash", "-c", readme_command("main-command")], cwd=clone, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (clone / "demo_out" / "song.mid").is_file() and (clone / "demo_out" / "song.png").is_file()
    # the test command, with the slow marker excluded so this test does not recurse
    cmd = readme_command("test-command") + " -x -k 'not fresh_clone'"
    r = subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    shutil.rmtree(clone, ignore_errors=True)
