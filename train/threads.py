"""CPU threads for training: the recipe's number, or with ``threads: auto`` the count with the highest
measured training throughput, measured once per process."""
from __future__ import annotations

import time

import torch
from torch import nn

_PICKED_THREADS: list[int] = []  # `threads: auto` measures once per process; later fits (pruning steps, QAT) reuse it


def pick_threads(model: nn.Module, example: torch.Tensor, candidates=None, steps: int = 3, log=print) -> int:
    """The CPU thread count with the highest measured training throughput on ``example`` (a batch).

    Measured, not assumed: on a 2-core host shared with other work, two threads ran a training step
    several times slower than one (OpenMP threads wait for each other), on an idle one faster."""
    import copy
    import os
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    candidates = sorted({1, n} | ({n // 2} if n >= 4 else set())) if candidates is None else candidates
    probe = copy.deepcopy(model).train()
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.0)
    y = torch.zeros(len(example), dtype=torch.long)
    rates = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(probe(example), y)
            probe_opt.zero_grad(set_to_none=True)
            loss.backward()
            probe_opt.step()
        rates[threads] = steps * len(example) / (time.perf_counter() - t0)
    best = max(rates, key=rates.get)
    torch.set_num_threads(best)
    log("  threads: " + ", ".join(f"{t}: {r:.0f} images/s" for t, r in rates.items()) + f" -> {best}")
    return best


def set_threads(threads, model: nn.Module, train_set, per_rank: int, memory_format, log) -> None:
    """CPU training threads: the recipe's number, or with "auto" the best measured on a first batch (once per
    process; later fits reuse it)."""
    if threads == "auto" and _PICKED_THREADS:
        torch.set_num_threads(_PICKED_THREADS[0])
    elif threads == "auto":
        x0 = torch.stack([train_set[i][0] for i in range(min(per_rank, len(train_set)))])
        _PICKED_THREADS.append(pick_threads(model, x0.to(memory_format=memory_format), log=log))
    elif threads:
        torch.set_num_threads(int(threads))
