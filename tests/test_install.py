"""Packaging: a plain (non-editable) `pip install .` gives the namespace and presets from any directory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_resolves_presets_from_another_directory(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for sub in ("orchestrator", "strategies", "comm", "launch", "cluster_configs"):
        assert (target / "meshpilot" / sub / "__init__.py").is_file(), sub
    assert not (target / "comm").exists(), "a top-level `comm` package would shadow Jupyter's"
    code = ("import meshpilot.orchestrator.config.loader as j, meshpilot.orchestrator.config.clusters as c;"
            "assert j.__file__.startswith(%r), j.__file__;"
            "job = j.job_from_dict({'model': 'llama-2-7b', 'cluster': 'dgx-h100'});"
            "print(job.cluster.gpus_per_node, job.model.layers, len(c.cluster_preset_names()))") % str(target)
    # run from an unrelated directory with only the installed copy importable (no checkout on the path)
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(target)!r}] + "
                        f"{[p for p in sys.path if 'site-packages' in p]!r}; " + code],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    gpus, layers, n = r.stdout.split()
    assert (gpus, layers) == ("8", "32") and int(n) >= 6
