"""The command line as a user types it: --version, overrides anywhere on the line, a closed pipe."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from meshpilot.orchestrator.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"meshpilot {version('meshpilot')}"


def test_overrides_after_an_option_are_accepted(capsys):
    assert main(["simulate", str(QUICKSTART), "--json", "plan.dp=1", "plan.micro_batch=2"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["plan_config"]["dp"] == 1 and est["plan_config"]["micro_batch"] == 2


def test_overrides_before_and_after_an_option_give_the_same_result(capsys):
    main(["simulate", str(QUICKSTART), "plan.dp=1", "--json", "plan.micro_batch=2"])
    a = json.loads(capsys.readouterr().out)
    main(["simulate", "--json", str(QUICKSTART), "plan.dp=1", "plan.micro_batch=2"])
    b = json.loads(capsys.readouterr().out)
    assert a == b


def test_a_closed_pipe_is_not_a_traceback():
    cmd = [sys.executable, "-m", "meshpilot.orchestrator.cli", "simulate", str(QUICKSTART), "--json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()        # before the command has written anything: its first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and "Traceback" not in err, err


def test_rich_markup_in_user_names_is_printed_literally(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text('model: {name: "[/x]", arch: llama, layers: 2, hidden: 64, heads: 4, vocab: 256}\n'
                   "cluster: local\ntrain: {seq_len: 32, global_batch: 4}\nplan: auto\n")
    assert main(["plan", str(job), "cluster.name=bold-[b]c", "cluster.gpus_per_node=2", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "[/x] on bold-[b]c (" in out
