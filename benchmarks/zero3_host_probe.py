"""Host-side cost of DeepSpeed ZeRO-3 vs ZeRO-2 on CPU/gloo (no GPU): where the a priori ZeRO-3 constants come from.

A tiny Hugging Face Llama (hidden 64, so the arithmetic is negligible) trained with DeepSpeed bf16 + AdamW
(torch_adam) over 2 gloo ranks; forward, backward and step are timed separately for 4 and 20 layers at
stages 2 and 3. The slopes per layer (20 vs 4 layers) of stage 3 minus stage 2, in units of the stage-2
host time of a layer's forward, give SimulatorConstants.zero3_fetch_s / zero3_step_tensor_s relative to
layer_overhead_s (7 fetched tensors per Llama layer at the default persistence threshold).

    PYTHONPATH=<dir with transformers> DS_ACCELERATOR=cpu python benchmarks/zero3_host_probe.py

2026-11-27, 2-core VM, DeepSpeed 0.19.8, transformers 5.24 (medians, seconds per step, forward/backward/step):
  stage 2,  4 layers: 0.021 / 0.043 / 0.013     stage 3,  4 layers: 0.034 / 0.077 / 0.053
  stage 2, 20 layers: 0.093 / 0.180 / 0.034     stage 3, 20 layers: 0.233 / 0.288 / 0.220
  per layer: stage-2 forward 4.5 ms; stage-3 extra: forward 7.9 ms (1.75x), backward 4.6 ms (1.0x),
  step 9.0 ms (2.0x) -> per fetched tensor ~0.25x (forward), ~0.15x (backward), ~0.29x (step) of a layer forward.
Run to run on that VM the numbers vary by ~30% (a second run, beside other work: stage 2 20 layers 0.134 / 0.264 /
0.047, stage 3 0.225 / 0.276 / 0.205); treat the ratios as order-of-magnitude priors.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time


def _rank(rank: int, world: int, stage: int, layers: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
                      vocab_size=512, max_position_embeddings=64, attn_implementation="sdpa")
    dsc = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=dsc, dtype=torch.bfloat16):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dsc)
    x = torch.randint(0, 512, (2, 32))
    times = []
    for _ in range(10):
        dist.barrier()
        t0 = time.perf_counter()
        loss = eng(input_ids=x, labels=x).loss
        t1 = time.perf_counter()
        eng.backward(loss)
        t2 = time.perf_counter()
        eng.step()
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    if rank == 0:
        med = [round(statistics.median(t[i] for t in times[3:]), 4) for i in range(3)]
        print(json.dumps(dict(stage=stage, layers=layers, forward_backward_step_s=med)), flush=True)
    dist.destroy_process_group()


def main() -> int:
    import multiprocessing as mp
    import random
    for stage in (2, 3):
        for layers in (4, 20):
            port = 20000 + random.randrange(10000)
            procs = [mp.get_context("spawn").Process(target=_rank, args=(r, 2, stage, layers, port)) for r in range(2)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
