"""The notice before DeepSpeed compiles an op on first use (orchestrator/train/engine_deepspeed.py):
which ops the engine loads, whether one is already built in its torch extension folder, and what
rank 0 logs to the console logger around the call. Nothing is compiled here."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from meshpilot.orchestrator.config.loader import load_job  # noqa: E402
from meshpilot.orchestrator.plan.plan import resolve_plan  # noqa: E402
from meshpilot.orchestrator.train.engine_deepspeed import (announce_op_builds, jit_build_pending,  # noqa: E402
                                                           optimizer_op_builder)

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


class FakeBuilder:
    """The parts of a DeepSpeed OpBuilder that the check reads."""
    name = "meshpilot_fake_op"

    def __init__(self, src: Path):
        self.src = src

    def sources(self) -> list[str]:
        return [str(self.src)]

    def deepspeed_src_path(self, p: str) -> str:
        return p


def test_an_op_counts_as_built_only_when_its_library_is_from_these_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    src = tmp_path / "op.cpp"
    src.write_text("// source\n")
    b = FakeBuilder(src)
    folder = tmp_path / "ext" / b.name
    assert jit_build_pending(b) == f"not built yet in {folder}"
    lib = folder / f"{b.name}.so"
    lib.write_bytes(b"\x7fELF")
    (folder / "build.ninja").write_text("build op.o: compile /elsewhere/.venv/deepspeed/op.cpp\n")
    assert "another DeepSpeed install" in jit_build_pending(b)          # ninja would rebuild it
    (folder / "build.ninja").write_text(f"build op.o: compile {src}\n")
    assert jit_build_pending(b) is None
    future = time.time() + 60
    os.utime(src, (future, future))
    assert "newer than" in jit_build_pending(b)


def test_the_real_shm_op_is_pending_in_an_empty_extension_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    from deepspeed.accelerator import get_accelerator
    b = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if b is None:
        pytest.skip("this accelerator has no shared-memory op")
    from deepspeed.ops.op_builder.builder import OpBuilder
    if b.name in OpBuilder._loaded_ops:
        pytest.skip("already loaded in this process")
    assert jit_build_pending(b) == f"not built yet in {tmp_path / 'ext' / b.name}"


def test_rank_0_announces_a_pending_build_and_its_time(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        pytest.skip("this accelerator has no shared-memory op")
    caplog.set_level(logging.INFO, logger="meshpilot.console")
    with announce_op_builds(["ShareMemCommBuilder"], rank=1):
        pass
    assert not caplog.records                                  # rank 0 speaks for the gang
    with announce_op_builds(["ShareMemCommBuilder"], rank=0):
        time.sleep(0.05)
    msgs = [r.getMessage() for r in caplog.records if r.name == "meshpilot.console"]
    assert msgs[0].startswith("building DeepSpeed op deepspeed_shm_comm (first use; cached afterwards): "
                              "not built yet in ")
    assert msgs[1].startswith("built DeepSpeed op deepspeed_shm_comm in ") and msgs[1].endswith(" s")
    caplog.clear()
    with announce_op_builds(["NoSuchBuilder"], rank=0):         # a check that fails says nothing
        pass
    assert not [r for r in caplog.records if r.name == "meshpilot.console"]


def test_the_optimizer_op_the_engine_loads():
    from meshpilot.strategies.deepspeed_config import deepspeed_config

    def op(*overrides: str, on_cpu: bool) -> str | None:
        job = load_job(str(QUICKSTART), list(overrides))
        return optimizer_op_builder(deepspeed_config(job, resolve_plan(job), on_cpu=on_cpu))

    assert op(on_cpu=True) is None                                       # torch's AdamW on CPU workers
    assert op(on_cpu=False) == "FusedAdamBuilder"
    assert op("plan.zero_stage=2", "plan.offload_optimizer=cpu", on_cpu=False) == "CPUAdamBuilder"
    assert op("train.optimizer=sgd", on_cpu=False) is None
