"""Every example job runs as its header says, on CPU workers, and ends in the loss range it states.

The runs share one local Ray cluster (``--address``), otherwise each is `meshpilot run EXAMPLE` as a
user types it. The quickstart is run by tests/test_ray_run.py; zo2_dp4 needs 4 GPUs (its planning
commands are run in tests/test_readme_commands.py).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_cluster import held_ray_cluster, subprocess_env

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CPU_EXAMPLES = ["tensor_parallel", "moe_expert_parallel", "zero3_offload", "zeroth_order_cpu", "plan_auto"]


def expected_range(path: Path) -> tuple[float, float, int]:
    """(low, high, steps) from the header line 'Expected: ... to LOW-HIGH in STEPS steps'."""
    m = re.search(r"to (\d+(?:\.\d+)?)-(\d+(?:\.\d+)?) in (\d+) steps", path.read_text())
    assert m, f"{path.name}: no 'Expected: ... to LOW-HIGH in N steps' line in the header"
    return float(m.group(1)), float(m.group(2)), int(m.group(3))


def test_every_example_states_its_command_and_expected_loss():
    for p in sorted(EXAMPLES.glob("*.yaml")):
        header = "".join(line for line in p.read_text().splitlines(keepends=True) if line.startswith("#"))
        assert re.search(rf"meshpilot (run|plan) +examples/{re.escape(p.name)}", header), p.name
        if p.stem in CPU_EXAMPLES:
            expected_range(p)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    with held_ray_cluster(tmp_path_factory.mktemp("holder")) as addr:
        yield addr


@pytest.mark.parametrize("name", CPU_EXAMPLES)
def test_example_runs_and_ends_in_its_stated_loss_range(name, ray_address, tmp_path):
    path = EXAMPLES / f"{name}.yaml"
    low, high, steps = expected_range(path)
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(path), "--address", ray_address,
                        "--run-dir", str(run_dir), "--no-progress"], capture_output=True, text=True,
                       env=subprocess_env(tmp_path / "home"), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "succeeded"
    assert s["results"][0]["step"] == steps
    assert low <= s["final_loss"] <= high, (name, s["final_loss"], (low, high))
