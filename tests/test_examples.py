"""Every example job runs as its header says, on CPU workers, and ends in the loss range it states.

The runs share one local Ray cluster (``--address``), otherwise each is `meshpilot run
examples/NAME.yaml` as a user types it in the repository root: the working folder holds a link
``examples`` to the repository's examples (the fine-tuning examples name their checkpoint and data
by relative paths), and the Ray workers run in another folder (the held cluster's). The quickstart
is run by tests/test_ray_run.py; zo2_dp4 needs 4 GPUs (its planning commands are run in
tests/test_readme_commands.py).

The fine-tuning examples start from the toy checkpoints of examples/assets (made by
examples/assets/make_assets.py, whose ``--check`` is run here against the committed files) and also
evaluate: their last evaluation is below their first. The ZeRO-2 example's end-of-run export is
checked against ``meshpilot export`` of the run's last checkpoint (bit for bit), against the
pretrained input (changed by training), and loaded with ``transformers``: its logits equal the
built-in model's with the checkpoint's weights.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from file_module import load_file
from ray_cluster import held_ray_cluster, subprocess_env

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ASSETS = EXAMPLES / "assets"
FINETUNE_EXAMPLES = ["finetune_llama_zero2", "finetune_llama_tp2", "finetune_moe_ep2", "mezo_opt_sentiment"]
CPU_EXAMPLES = ["tensor_parallel", "moe_expert_parallel", "zero3_offload", "zeroth_order_cpu", "plan_auto",
                *FINETUNE_EXAMPLES]
ASSET_MODELS = ("tiny-llama", "tiny-opt", "tiny-mixtral")


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


@pytest.fixture(scope="module")
def example_run(ray_address, tmp_path_factory):
    """``example_run(name)``: the run directory of `meshpilot run examples/NAME.yaml` (run once per module)."""
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            cwd = tmp_path_factory.mktemp(name)
            (cwd / "examples").symlink_to(EXAMPLES, target_is_directory=True)
            run_dir = cwd / "run"
            r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", f"examples/{name}.yaml",
                                "--address", ray_address, "--run-dir", str(run_dir), "--no-progress"],
                               capture_output=True, text=True, env=subprocess_env(cwd / "home"), cwd=cwd, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            done[name] = run_dir
        return done[name]

    return run


@pytest.mark.parametrize("name", CPU_EXAMPLES)
def test_example_runs_and_ends_in_its_stated_loss_range(name, example_run):
    path = EXAMPLES / f"{name}.yaml"
    low, high, steps = expected_range(path)
    s = json.loads((example_run(name) / "summary.json").read_text())
    assert s["status"] == "succeeded"
    assert s["results"][0]["step"] == steps
    assert low <= s["final_loss"] <= high, (name, s["final_loss"], (low, high))
    if name in FINETUNE_EXAMPLES:
        evals = [e["eval_loss"] for e in s["results"][0]["evals"]]
        assert len(evals) >= 2 and evals[-1] < evals[0], (name, evals)
        assert s["eval_loss"] == evals[-1]


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(directory / "model.safetensors"))


def test_zero2_finetune_export_matches_checkpoint_and_loads_in_transformers(example_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.hf_checkpoint import from_hf_state_dict
    from meshpilot.strategies.model import build_model

    run_dir = example_run("finetune_llama_zero2")
    export = run_dir / "export"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (export / f).read_bytes() == (ASSETS / "tiny-llama" / f).read_bytes(), f
    end_of_run = _tensors(export)

    # meshpilot export of the last checkpoint (DeepSpeed's ZeRO-2 partitions joined offline) == the export
    # gathered from the live engines at the end of the run
    offline = tmp_path / "offline"
    r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "export", str(run_dir), "--out", str(offline)],
                       capture_output=True, text=True, env=subprocess_env(tmp_path / "home"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from_checkpoint = _tensors(offline)
    assert sorted(from_checkpoint) == sorted(end_of_run)
    for k, v in end_of_run.items():
        assert v.dtype == torch.float32 and torch.equal(v, from_checkpoint[k]), k

    # training moved every weight matrix away from the pretrained input
    pretrained = _tensors(ASSETS / "tiny-llama")
    assert sorted(pretrained) == sorted(end_of_run)
    moved = {k: (end_of_run[k] - pretrained[k]).abs().max().item() for k in pretrained}
    assert all(d > 1e-4 for d in moved.values()), {k: d for k, d in moved.items() if d <= 1e-4}

    # transformers loads the export; its logits equal the built-in model's with the checkpoint's weights
    job = load_job(str(run_dir / "job.yaml"))
    model = build_model(job.model, Plan(), None, seed=0).eval()
    model.load_state_dict(from_hf_state_dict(from_checkpoint, job.model), strict=True)
    hf = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    ids = torch.randint(0, job.model.vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, model(ids)
    assert want.shape == got.shape == (2, 24, job.model.vocab)
    assert want.abs().max() > 1.0
    err = (got - want).abs().max().item()
    assert err <= 2e-5, f"max |built-in - transformers| = {err:.3g}"


def _make_assets():
    return load_file(ASSETS / "make_assets.py")


def test_committed_assets_are_what_make_assets_builds(tmp_path, monkeypatch, capsys):
    """``make_assets.py --check`` (tokenizer, model configs and data rebuilt without pre-training) agrees
    with the committed files, and reports a changed config; the assets stay small."""
    r = subprocess.run([sys.executable, str(ASSETS / "make_assets.py"), "--check"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "consistent" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]

    sizes = {m: sum(f.stat().st_size for f in (ASSETS / m).iterdir()) for m in ASSET_MODELS}
    assert all(s < 2 * 2**20 for s in sizes.values()), sizes
    data = sum(f.stat().st_size for f in (EXAMPLES / "data").iterdir())
    assert sum(sizes.values()) + data < 6 * 2**20
    for m in ASSET_MODELS:
        cfg = json.loads((ASSETS / m / "config.json").read_text())
        vocab = len(json.loads((ASSETS / m / "tokenizer.json").read_text())["model"]["vocab"])
        assert cfg["vocab_size"] == vocab, (m, cfg["vocab_size"], vocab)

    # a committed config that no longer matches the script is reported
    mod = _make_assets()
    copy = tmp_path / "assets"
    for m in ASSET_MODELS:
        (copy / m).mkdir(parents=True)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (copy / m / f).write_bytes((ASSETS / m / f).read_bytes())
    cfg = json.loads((copy / "tiny-opt" / "config.json").read_text())
    cfg["ffn_dim"] += 1
    (copy / "tiny-opt" / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(mod, "ASSETS", copy)
    capsys.readouterr()
    assert mod.check() == 1
    out = capsys.readouterr().out
    assert "tiny-opt/config.json: ffn_dim" in out and "1 differences" in out, out
