"""Multi-GPU (or multi-process CPU) training with DistributedDataParallel.

Launch with torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT::

    torchrun --nproc_per_node=4 -m edgepipe.train.distributed recipes/fashion-mnist.yaml --profile full --out runs/fm

Every process runs the same recipe; only rank 0 writes files. The global batch is stages.train.batch_size
(each rank takes batch_size / world_size), so a run gives the same result at any process count.
:func:`spawn` starts N local processes on the loopback interface (what the tests use with gloo on CPU).
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str = "cpu") -> DistInfo:
    """Join the process group torchrun (or :func:`spawn`) describes in the environment; one process: no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP around the model when more than one process runs. BatchNorm stays per process (no SyncBatchNorm:
    converting would swap the modules the pruner tracks)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)


def agree(value):
    """Rank 0's ``value`` on every rank (a decision that must not differ, e.g. a latency-based stop)."""
    if not current().enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(*args)`` in ``world_size`` local processes that form a process group on loopback."""
    import torch.multiprocessing as mp
    mp.spawn(_spawned, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def main(argv=None) -> int:
    """torchrun entry point: the train (and prune) stages of a recipe on every process."""
    import argparse

    from edgepipe import UserError
    from edgepipe.recipe import load_recipe
    from edgepipe.steps import StepCache, prepare_out_dir
    from edgepipe.train.models import build_from_config
    from edgepipe.train.stage import prune_stage, train_stage

    p = argparse.ArgumentParser(prog="torchrun ... -m edgepipe.train.distributed")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--profile")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.profile, args.set + (["stages.train.resume=true"] if args.resume else []))
        out = prepare_out_dir(Path(args.out))
        # the process group does not exist yet (fit creates it), so torchrun's RANK tells who logs
        cache = StepCache(out, print if int(os.environ.get("RANK", "0")) == 0 else (lambda m: None))
        torch.manual_seed(0)
        spec = build_from_config(recipe.model)  # weights, labels and preprocess overrides as `edgepipe run` does
        spec = train_stage(spec, recipe, out, cache)
        if recipe.stages.prune.enabled:
            prune_stage(spec, recipe, out, cache)
    except UserError as exc:
        print(f"edgepipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print("trained; now run `edgepipe run` with the same recipe and --out to reuse these steps and compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
