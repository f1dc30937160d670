"""Segments the caching allocator adds for the loss's logit-sized tensors after a ZeRO 1-2 engine build.

With optimizer offload at ZeRO 1-2, the engine build leaves two kinds of free cached blocks on the GPU
(:func:`.memory.engine_build_terms`): the model's per-parameter construction blocks, none larger than the
fp32 draw of the largest parameter (4 n_max bytes), and the block of the partition's 16-bit clone
(w P_s, one segment), freed once the fp32 master is made on the host. Nothing of the step is on the GPU,
so those are the blocks the training steps find. A request that fits no free block gets a new segment of
its own size, which the allocator keeps (PyTorch's default mode: a freed block serves a later request only
where that request fits inside it; a free block is split for a smaller request and merges back with its
free neighbours within its segment). The requests larger than every construction block are the loss's,
per micro-batch of T = b s tokens on a rank holding V/t of the vocabulary
(strategies/tensor_parallel.py ``_VocabParallelCE``):

    forward:  A = logits (16-bit, 2 T V/t), B = z = A.float(), C = z - m, D = exp(C)   (4 T V/t each)
              C, B, A freed as the forward returns; D (the softmax) saved
    backward: E = the logits' gradient (2 T V/t), then D and E freed.

Each request is placed best-fit (the smallest free block that holds it) among the clone's block and the
segments earlier requests made; the sum of the new segments over three steps is what the reserve gains
above the build's. The second step can still add one (its 16-bit logits take the smallest new segment,
and the clone's block no longer holds three fp32 tensors).

Traced (benchmarks/results/2026-12-01-s10-h200x1/call3_trace, built-in opt-6.7b with 16 layers, ZeRO-2 +
optimizer offload, mb 8, checkpointing, one H200): the clone's 6.40 GiB block held A and B at the first step
and two 3.07 GiB segments were new for C and D; from the second step A and B took those two and C and D the
clone's block; nothing new after the first step. This placement gives the same: 6.14 GiB.

Only where checkpointing leaves nothing else larger than a construction block alive at the loss is this
the whole story: without it the saved activations larger than those blocks take the clone's block first and
their own segments, which the allocated peak already counts.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SEGMENT_ROUND = 2 * 2**20        # large requests get segments rounded up to 2 MiB (CUDACachingAllocator)
STEPS = 3


def loss_request_sequence(logits16: float, logits32: float):
    """The loss's requests and frees in the order a training micro-step makes them (module docstring)."""
    return [("alloc", "A", logits16), ("alloc", "B", logits32), ("alloc", "C", logits32), ("alloc", "D", logits32),
            ("free", "C"), ("free", "B"), ("free", "A"), ("alloc", "E", logits16), ("free", "D"), ("free", "E")]


def new_segment_bytes(free_segments: tuple[float, ...], events, steps: int = STEPS) -> float:
    """Bytes of the segments a best-fit caching allocator adds for ``events`` repeated ``steps`` times, starting
    with ``free_segments`` free. A segment is a list of [size, owner] blocks (owner None: free)."""
    segments = [[[float(s), None]] for s in free_segments if s > 0]
    new = 0.0
    for _ in range(steps):
        for ev in events:
            if ev[0] == "alloc":
                _, tag, size = ev
                fits = [(b[0], si, bi) for si, seg in enumerate(segments) for bi, b in enumerate(seg)
                        if b[1] is None and b[0] >= size]
                if not fits:
                    seg_size = float(np.ceil(size / SEGMENT_ROUND) * SEGMENT_ROUND)
                    segments.append([[size, tag]] + ([[seg_size - size, None]] if seg_size > size else []))
                    new += seg_size
                    continue
                block, si, bi = min(fits)
                segments[si][bi] = [size, tag]
                if block > size:
                    segments[si].insert(bi + 1, [block - size, None])
            else:
                for seg in segments:
                    for b in seg:
                        if b[1] == ev[1]:
                            b[1] = None
                    merged = [seg[0]]
                    for b in seg[1:]:
                        if b[1] is None and merged[-1][1] is None:
                            merged[-1][0] += b[0]
                        else:
                            merged.append(b)
                    seg[:] = merged
    return new


@lru_cache(maxsize=4096)
def _loss_segments(clone: float, logits16: float, logits32: float, largest_construction: float) -> float:
    events = [e for e in loss_request_sequence(logits16, logits32)
              if e[0] == "free" or e[2] > largest_construction]
    if not any(e[0] == "alloc" for e in events):
        return 0.0
    kept = {e[1] for e in events if e[0] == "alloc"}
    events = [e for e in events if e[1] in kept]
    return new_segment_bytes((clone,), events)


def loss_segments(applies, clone, tokens, vocab_per_rank, largest_construction) -> np.ndarray:
    """Bytes per rank of the new segments the loss's tensors take beside the engine build's reserve, for each
    plan where ``applies`` (module docstring); 0 elsewhere. ``clone``: the clone's free block (bytes, 0 where
    there is none); ``tokens``: b s; ``vocab_per_rank``: V/t; ``largest_construction``: 4 n_max bytes."""
    applies, clone, tokens, vocab, cmax = np.broadcast_arrays(
        np.asarray(applies, dtype=bool), *(np.asarray(x, dtype=float) for x in (clone, tokens, vocab_per_rank,
                                                                              largest_construction)))
    out = np.zeros(applies.shape)
    for i in np.ndindex(applies.shape):
        if applies[i]:
            out[i] = _loss_segments(float(clone[i]), 2.0 * tokens[i] * vocab[i], 4.0 * tokens[i] * vocab[i],
                                    float(cmax[i]))
    return out
