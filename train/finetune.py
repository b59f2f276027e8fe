"""The training loop shared by fine-tuning, pruning recovery and quantization-aware training.

CUDA when there is one (``device: auto``): mixed precision with torch.autocast (bf16 where supported, else
fp16 with a GradScaler), channels_last, pinned memory. A checkpoint (weights + optimizer + epoch + step,
plain tensors only, loadable with ``weights_only=True``) is written atomically every tenth of an epoch;
``resume`` continues from that step. Seeds make a run repeatable: shuffling and augmentation draw from
(seed, epoch), so a resumed epoch sees the same batches.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgepipe import UserError
from edgepipe.train import distributed
from edgepipe.train.checkpoint import save_checkpoint
from edgepipe.train.data import BadImages, ImageSet
from edgepipe.train.models import head_module
from edgepipe.train.threads import _PICKED_THREADS, pick_threads, set_threads  # noqa: F401 (tests reach them here)

BN_RECALIBRATION_BATCHES = 20


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"stages.train.device is {name} but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, enabled: bool):
    """bf16 on GPUs that have it, fp16 otherwise; None (fp32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class FitResult:
    epochs_done: float = 0.0
    train_loss: float = float("nan")
    train_top1: float = float("nan")
    val_top1: float | None = None
    images_per_s: float = 0.0
    device: str = "cpu"
    amp: str | None = None
    skipped_images: list = field(default_factory=list)
    resumed_from_epoch: int | None = None
    resumed_from_step: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _SkipSampler(torch.utils.data.Sampler):
    """The wrapped sampler's order without its first ``skip`` indices (a resumed epoch reads no batch twice)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _loader(dataset: ImageSet, batch: int, shuffle: bool, seed: int, workers: int, device, info, drop_last: bool):
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=shuffle, seed=seed, drop_last=drop_last)
    skip = _SkipSampler(sampler)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=skip, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=drop_last,
                                       persistent_workers=False), sampler, skip


def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up, then the schedule."""
    warm = int(cfg.warmup_epochs / max(cfg.epochs, 1e-9) * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** int(progress * 3))
    return cfg.lr


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases/BN; the classifier head at ``head_lr_scale`` x lr
    (a freshly initialised head has far to go while the pretrained backbone should move little)."""
    head = head_module(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    scale = getattr(cfg, "head_lr_scale", 1.0)
    groups = []
    for is_head in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head_ids) == is_head]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr_scale": scale if is_head else 1.0})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)


def load_training_state(path: Path) -> dict:
    """A training checkpoint, loaded with weights_only=True (plain tensors and numbers; nothing unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} refused: not a plain tensor checkpoint ({str(exc).splitlines()[0][:120]}); "
                        f"delete it to start over") from None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at ``temperature``, scaled by T^2."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=1), nn.functional.softmax(teacher / t, dim=1),
                                reduction="batchmean") * t * t


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def epoch_plan(cfg, n_images: int, steps_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, in all, epochs to start) for ``cfg.epochs``, which may be fractional."""
    if steps_per_epoch == 0:
        raise UserError(f"{n_images} training images is less than one batch of {cfg.batch_size}; lower stages.train.batch_size")
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    return steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch)


def place(model: nn.Module, teacher: nn.Module | None, cfg, device, train_set: ImageSet, per_rank: int, log):
    """Move the model (and teacher) to ``device`` in the recipe's memory format and set the CPU threads;
    returns the memory format."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if device.type == "cpu":
        set_threads(cfg.threads, model, train_set, per_rank, memory_format, log)
    if teacher is not None:
        teacher.to(device=device, memory_format=memory_format).eval()
    return memory_format


class Running:
    """Loss and top-1 accuracy averaged over the batches of an epoch so far."""

    def __init__(self):
        self.loss_sum = self.hits = self.n = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += float(loss.detach()) * len(y)
        self.hits += float((logits.argmax(1) == y).sum())
        self.n += len(y)

    loss = property(lambda self: self.loss_sum / max(self.n, 1))
    top1 = property(lambda self: self.hits / max(self.n, 1))

    def describe(self) -> str:
        return f"loss {self.loss:.4f}, train top-1 {self.top1:.4f}"


def save_training_state(checkpoint: Path, model: nn.Module, optimizer, scaler, epoch_done: int, step: int) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_done, "step": step}
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    save_checkpoint(checkpoint, payload)


def resume_from(checkpoint: Path, model: nn.Module, optimizer, scaler, steps_per_epoch: int, result: FitResult,
                total_steps: int, log) -> int:
    """Model, optimizer (and AMP scaler) state from a training checkpoint; returns the step to go on from."""
    state = load_training_state(checkpoint)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    step = int(state.get("step", int(state["epoch"]) * steps_per_epoch))
    result.resumed_from_epoch, result.resumed_from_step = int(state["epoch"]), step
    log(f"  resumed from {checkpoint} at step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f})")
    return step


def set_trainable(model: nn.Module, head: nn.Module | None, frozen: bool) -> None:
    """Every parameter trainable, or with ``frozen`` only the classifier head's (a model without a head that
    can be told apart stays trainable)."""
    frozen = frozen and head is not None
    for p in model.parameters():
        p.requires_grad_(not frozen)
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)


@dataclass
class TrainStep:
    """One optimizer step on a batch: the schedule's learning rate, the batch moved to the device, the loss
    (under autocast when ``dtype``; with a ``teacher``, mixed with the distillation loss), backward and step."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    dtype: object
    memory_format: object
    cfg: object
    total_steps: int
    teacher: nn.Module | None = None
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, device) -> tuple:
        """Returns (loss, logits, y on the device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.total_steps, self.cfg) * group.get("lr_scale", 1.0)
        x = x.to(device, non_blocking=True, memory_format=self.memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
            if self.teacher is not None and self.distill_alpha > 0:
                with torch.no_grad():
                    soft = self.teacher(x).float()
                loss = ((1 - self.distill_alpha) * loss
                        + self.distill_alpha * distillation_loss(logits.float(), soft, self.distill_temperature))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss, logits, y


def finish_epoch(model: nn.Module, ddp: nn.Module, loader, val_set, train_step: TrainStep, device, is_main: bool,
                 result: FitResult, running: Running) -> None:
    """The epoch's training loss and top-1 into ``result``, BatchNorm statistics re-estimated over training
    batches, then the validation top-1 (kept as it was without a validation set, and on the other ranks)."""
    result.train_loss, result.train_top1 = running.loss, running.top1
    recalibrate_batchnorm(ddp, loader, device, train_step.memory_format, train_step.dtype)
    if val_set is not None and len(val_set) and is_main:
        result.val_top1 = evaluate(model, val_set, train_step.cfg.batch_size, device, train_step.memory_format,
                                   train_step.dtype)


def epoch_line(desc: str, epoch: int, n_epochs: int, result: FitResult, device, eta_s: float | None) -> str:
    val = f", val top-1 {result.val_top1:.4f}" if result.val_top1 is not None else ""
    return (f"  {desc} epoch {epoch + 1}/{n_epochs}: loss {result.train_loss:.4f}, train top-1 {result.train_top1:.4f}"
            f"{val}, {result.images_per_s:.0f} images/s on {device}" + (f" ({result.amp})" if result.amp else "")
            + (f", ETA {_eta(eta_s)}" if eta_s is not None else ""))


def to_cpu(model: nn.Module, teacher: nn.Module | None) -> None:
    """After training: the model (in eval mode) and the teacher back on the CPU, contiguous."""
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    if teacher is not None:
        teacher.to("cpu", memory_format=torch.contiguous_format)


def seconds_since(t0: float, device) -> float:
    """Wall time since ``t0`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def fit(model: nn.Module, train_set: ImageSet, val_set: ImageSet | None, cfg, checkpoint: Path | None = None,
        resume: bool = False, on_bad_image: str = "skip", log=print, desc: str = "train",
        teacher: nn.Module | None = None, distill_alpha: float = 0.0, distill_temperature: float = 4.0) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs`` (may be fractional) with the recipe's optimizer/schedule.

    ``cfg`` has the fields of recipe.TrainStage. With several processes (torchrun) the model is wrapped in
    DDP and each rank reads its share of every global batch of ``cfg.batch_size`` images. With a
    ``teacher`` the loss is ``(1 - distill_alpha) * CE + distill_alpha * KD`` (knowledge distillation,
    e.g. from the unpruned model while a pruned one recovers). A progress line (step, images/s, ETA) is
    logged every tenth of an epoch, and the checkpoint is written there too, so ``resume`` loses at most
    a tenth of an epoch.
    """
    device = select_device(cfg.device)
    info = distributed.init_from_env(device.type)
    seed_everything(cfg.seed)
    per_rank = max(1, cfg.batch_size // info.world_size)
    loader, sampler, skipper = _loader(train_set, per_rank, True, cfg.seed, cfg.workers, device, info, drop_last=True)
    steps_per_epoch, total_steps, n_epochs = epoch_plan(cfg, len(train_set), len(sampler) // per_rank)
    report_every = max(1, steps_per_epoch // 10)
    memory_format = place(model, teacher, cfg, device, train_set, per_rank, log if info.is_main else (lambda m: None))
    dtype = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ddp = distributed.wrap(model, info, device)
    optimizer = make_optimizer(model, cfg)
    train_step = TrainStep(ddp, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), optimizer, scaler, dtype,
                           memory_format, cfg, total_steps, teacher, distill_alpha, distill_temperature)
    result = FitResult(device=str(device), amp=str(dtype).replace("torch.", "") if dtype else None)
    bad = BadImages(on_bad_image, log if info.is_main else (lambda m: None))

    resumable = resume and checkpoint is not None and Path(checkpoint).is_file()
    step = resume_from(Path(checkpoint), model, optimizer, scaler, steps_per_epoch, result, total_steps, log) if resumable else 0

    def save(epoch_done: int) -> None:
        if checkpoint is not None and info.is_main:
            save_training_state(checkpoint, model, optimizer, scaler, epoch_done, step)

    seen, busy, start_step = 0, 0.0, step
    interactive = info.is_main and sys.stderr.isatty()  # a bar on a terminal; in a log file only the lines below
    for epoch in range(step // steps_per_epoch, n_epochs):
        train_set.epoch = epoch
        sampler.set_epoch(epoch)
        skipper.skip = (step - epoch * steps_per_epoch) * per_rank
        set_trainable(model, head_module(model), frozen=epoch < cfg.freeze_backbone_epochs)
        ddp.train()
        running = Running()
        epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = tqdm(loader, desc=f"  {desc} epoch {epoch + 1}/{n_epochs}", leave=False, disable=not interactive,
                   mininterval=2.0, unit="batch", total=epoch_steps - (step - epoch * steps_per_epoch))
        t0 = time.perf_counter()
        for x, y, idx in bar:
            if step >= total_steps:
                break
            x, y = bad.filter(train_set, x, y, idx)
            if not len(y):
                continue
            loss, logits, y = train_step(x, y, step, device)
            step += 1
            running.add(loss, logits, y)
            seen += len(y) * info.world_size
            bar.set_postfix(loss=f"{running.loss:.3f}", acc=f"{running.top1:.3f}", refresh=False)
            in_epoch = step - epoch * steps_per_epoch
            if in_epoch % report_every == 0 and in_epoch < epoch_steps:
                save(epoch)  # first, so a logged line means the run can resume from there
                elapsed = busy + time.perf_counter() - t0
                log(f"  {desc} epoch {epoch + 1}/{n_epochs} step {in_epoch}/{epoch_steps}: {running.describe()}, "
                    f"{seen / elapsed:.0f} images/s, ETA {_eta((total_steps - step) * elapsed / (step - start_step))}")
        busy += seconds_since(t0, device)
        bar.close()
        skipper.skip = 0
        finish_epoch(model, ddp, loader, val_set, train_step, device, info.is_main, result, running)
        result.epochs_done = min(step / steps_per_epoch, cfg.epochs)
        save(epoch + 1)
        distributed.barrier(info)
        result.images_per_s = seen / busy if busy else 0.0
        log(epoch_line(desc, epoch, n_epochs, result, device,
                       (total_steps - step) * busy / max(step - start_step, 1) if step < total_steps else None))
    result.skipped_images = bad.paths
    to_cpu(model, teacher)
    return result


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device, memory_format=torch.contiguous_format, dtype=None,
                          batches: int = BN_RECALIBRATION_BATCHES) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over ``batches`` training batches.

    The running statistics follow the weights only slowly (EfficientNet-Lite's BN momentum is 0.01), so after a
    short fine-tune, and above all after pruning changed every layer's input, eval-mode accuracy lags far
    behind (measured: 0.22 vs 0.74 train top-1 after a pruning recovery epoch). A cheap forward-only pass fixes it.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i, (x, y, _) in enumerate(loader):
        if i >= batches:
            break
        x = x[y >= 0].to(device, memory_format=memory_format)
        if len(x) > 1:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageSet, batch_size: int = 64, device=torch.device("cpu"),
             memory_format=torch.contiguous_format, dtype=None) -> float:
    """Top-1 of ``model`` on ``dataset`` (unreadable images skipped)."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    hits = n = 0
    for x, y, _ in loader:
        keep = y >= 0
        x, y = x[keep].to(device, memory_format=memory_format), y[keep].to(device)
        if not len(y):
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            hits += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return hits / n if n else float("nan")
