"""The worker's command-line help names the file `meshpilot run` writes into the run directory."""
from __future__ import annotations

import pytest


def test_worker_help_names_the_run_directorys_job_yaml(capsys):
    from meshpilot.orchestrator.train import worker
    with pytest.raises(SystemExit) as e:
        worker.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "resolved_job.yaml" not in text and "<run dir>/job.yaml" in text
    assert "resolved_job.yaml" not in (worker.__doc__ or "")


def test_the_run_directory_holds_job_yaml(tmp_path, monkeypatch):
    from pathlib import Path

    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.run.session import RunSession, plan_job
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    quickstart = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    job = load_job(str(quickstart), [])
    plan, est = plan_job(job)
    s = RunSession.create(job, plan, est, job_path=str(quickstart), run_dir=str(tmp_path / "run"))
    s.close()
    assert load_job(str(tmp_path / "run" / "job.yaml"), []).train.steps == job.train.steps
