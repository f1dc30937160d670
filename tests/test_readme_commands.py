"""Every `meshpilot` command in the README runs as written against the README's own job file.

The README's job (the ```yaml block of "A short tour") is written to job.yaml in a temporary folder
and each command of the ```bash blocks is run there with its comment removed (``examples/`` is linked
there, for the commands the README runs from the repository root). Planning commands must
succeed. Commands that need what this machine lacks must refuse cleanly (exit 2, one line, no
traceback): `probe` of a GPU preset and `run` of the 4-GPU job without GPUs, `logs`/`cancel`/
`submit --status` of the README's placeholder ids. `submit` commands run with --dry-run added where
they lack it, so nothing is sent to a cluster. The two commands that install (`bash scripts/install.sh`)
are what .ci/run executes; the quickstart they run is tests/test_ray_run.py's first run.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("meshpilot "):
                continue
            # a line may hold several commands separated by runs of spaces (the submit --status line)
            for part in re.split(r"\s{3,}(?=meshpilot )", line):
                out.append(part.strip())
    return out


def _gpu_visible() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except OSError:
        return False


def _expect(cmd: str) -> int:
    words = shlex.split(cmd)
    sub = words[1]
    if sub == "probe" and not _gpu_visible():
        return 2                      # a GPU preset is not calibrated without its GPUs
    if sub == "run" and not _gpu_visible():
        return 2                      # the README's job needs 4 GPUs: refused at once
    if sub in ("logs", "cancel", "export", "calibrate") and any("RUN_ID" in w for w in words):
        return 2                      # the README's placeholder run id
    if sub == "submit" and any(w in words for w in ("--status", "--logs", "--cancel")):
        return 2                      # slurm:1234 is not a submission of this machine
    return 0


def test_the_readme_has_its_commands():
    cmds = readme_commands()
    assert len(cmds) >= 15 and any(c.startswith("meshpilot plan") for c in cmds)
    assert "bash scripts/install.sh --test && python3 -m pytest -q" in README
    assert (ROOT / ".ci" / "run").read_text().count("bash scripts/install.sh --test && python3 -m pytest -q") == 1
    assert 'ROOT / "examples" / "quickstart.yaml"' in (ROOT / "tests" / "test_ray_run.py").read_text()


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command(cmd, tmp_path):
    (tmp_path / "job.yaml").write_text(next(b for b in _blocks("yaml") if "plan:" in b))
    (tmp_path / "examples").symlink_to(ROOT / "examples")     # commands "from the repository root" name examples/
    words = shlex.split(cmd)
    if words[1] == "submit" and "--dry-run" not in words and not any(
            w in words for w in ("--list", "--status", "--logs", "--cancel")):
        words.append("--dry-run")
    env = dict(os.environ, MESHPILOT_HOME=str(tmp_path / "home"))
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", *words[1:]], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=120)
    want = _expect(cmd)
    assert r.returncode == want, f"{cmd}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    if want == 2:
        assert r.stderr.startswith("meshpilot: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
