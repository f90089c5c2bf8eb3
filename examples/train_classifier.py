"""Train a Mamba-Adaptor / VMamba classifier: scikit-learn's digits by default, or an ImageFolder tree.

Single process (CPU or one GPU):
    python examples/train_classifier.py --model mamba_adaptor_b1 --img-size 32 --epochs 3
Several processes (DistributedDataParallel; gloo on the CPU, nccl on GPUs):
    torchrun --nproc_per_node=2 examples/train_classifier.py --model mamba_adaptor_b1
Transfer learning (Tables 4, 6): a pretrained VMamba, parallel adaptors, frozen backbone:
    python examples/train_classifier.py --model vmamba_tiny --checkpoint vmamba_tiny.pth \
        --adaptors parallel --freeze-backbone --data /path/to/imagefolder --img-size 224

The digits (1797 8x8 grey images, shipped with scikit-learn, no download) are upsampled to --img-size and
split 80/20 into train/val. An ImageFolder path holds <root>/<class>/<image> files (or <root>/train and
<root>/val trees). AMP (bfloat16, or float16 with loss scaling) runs on CUDA. Each epoch appends a row to
<output>/log.csv and rewrites <output>/log.json; <output>/last.pth is the checkpoint --resume continues
from.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from tqdm import tqdm

from mamba_adaptor_ops.models import (
    create_model,
    freeze_backbone,
    insert_adaptors,
    list_models,
    load_checkpoint,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOG_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "time_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mamba_adaptor_b1", choices=list_models())
    parser.add_argument("--data", default="digits", help="'digits' or an ImageFolder root")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--drop-path", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0: no limit)")
    parser.add_argument("--val-samples", type=int, default=0, help="evaluate on the first N val images (0: all)")
    parser.add_argument("--checkpoint", default="", help="weights to start from (this library's or official VMamba)")
    parser.add_argument("--adaptors", choices=["none", "parallel", "sequential"], default="none",
                        help="insert adaptors into the built (e.g. pretrained) model")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the adaptors and the head")
    parser.add_argument("--output", default="runs/train_classifier")
    parser.add_argument("--resume", default="", help="a checkpoint to resume, or 'auto' for <output>/last.pth")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--amp", choices=["auto", "off"], default="auto", help="autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- data


def digits_datasets(img_size: int, seed: int) -> tuple[Dataset, Dataset, int]:
    """scikit-learn's digits as (3, img_size, img_size) normalised tensors, split 80/20 (fixed by `seed`)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = len(labels) // 5
    data = TensorDataset(images.contiguous(), labels)
    return Subset(data, order[n_val:].tolist()), Subset(data, order[:n_val].tolist()), 10


class ImageFolder(Dataset):
    """<root>/<class>/<image> files read with Pillow, resized to a square and normalised: (3, size, size)."""

    EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

    def __init__(self, root: Path, size: int, classes: list[str] | None = None) -> None:
        self.classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"ImageFolder: {root} has no class folders (expected <root>/<class>/<image>)")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in self.EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"ImageFolder: no images under {root}")
        self.size = size
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = pixels.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std, label


def folder_datasets(root: Path, img_size: int, seed: int) -> tuple[Dataset, Dataset, int]:
    """<root>/train and <root>/val when both exist, else <root> split 80/20 (fixed by `seed`)."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = ImageFolder(root / "train", img_size)
        return train, ImageFolder(root / "val", img_size, train.classes), len(train.classes)
    data = ImageFolder(root, img_size)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, len(data) // 5)
    return Subset(data, order[n_val:]), Subset(data, order[:n_val]), len(data.classes)


# ---------------------------------------------------------------------------------------- distributed


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (env://; nccl with CUDA, gloo otherwise) or alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ------------------------------------------------------------------------------------------ training


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    model = create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)  # a different head size keeps the fresh head
    if args.adaptors != "none":
        insert_adaptors(model, form=args.adaptors)
    if args.freeze_backbone:
        freeze_backbone(model)
    return model.to(device)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n not in no_decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr)


def lr_lambda(total_steps: int, warmup_steps: int):
    def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def autocast_context(device: torch.device, args: argparse.Namespace):
    if device.type != "cuda" or args.amp == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, rank: int, world: int, args, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over `data`, each process evaluating every world-th sample."""
    model.eval()
    shard = Subset(data, list(range(rank, len(data), world)))
    loss_sum = correct = count = 0.0
    amp, _ = autocast_context(device, args)
    for x, y in DataLoader(shard, batch_size=args.batch_size * 2, num_workers=args.workers):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def append_log(output: Path, row: dict) -> None:
    csv_path, json_path = output / "log.csv", output / "log.json"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    json_path.write_text(json.dumps(rows + [row], indent=1))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    output = Path(args.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)

    if args.data == "digits":
        train_set, val_set, num_classes = digits_datasets(args.img_size, args.seed)
    else:
        train_set, val_set, num_classes = folder_datasets(Path(args.data), args.img_size, args.seed)
    if 0 < args.val_samples < len(val_set):
        val_set = Subset(val_set, list(range(args.val_samples)))

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(args, num_classes, device)
    torch.manual_seed(args.seed + rank)  # different stochastic depth per process
    random.seed(args.seed + rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images per process")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, args.warmup_steps))
    amp, scaler = autocast_context(device, args)

    start_epoch, step, best_acc = 0, 0, 0.0
    resume = output / "last.pth" if args.resume == "auto" else Path(args.resume) if args.resume else None
    if resume is not None and resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, best_acc = state["epoch"] + 1, state["step"], state["best_acc"]
        if rank == 0:
            print(f"resumed from {resume}: epoch {start_epoch}, step {step}")
    elif args.resume and args.resume != "auto":
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")

    if rank == 0:
        print(f"{args.model}: {trainable / 1e6:.3f}M trainable parameters, {world} process(es) on {device}, "
              f"{len(train_set)} train / {len(val_set)} val images of {args.img_size}x{args.img_size}")
    t_start = time.time()
    result: dict = {}
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp.train()
        t_epoch, loss_sum, correct, seen = time.time(), 0.0, 0.0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0 or args.no_progress, leave=False)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with amp:
                logits = ddp(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step >= total_steps:
                break
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
        val_loss, val_acc = evaluate(model, val_set, rank, world, args, device)
        best_acc = max(best_acc, val_acc)
        result = {
            "epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
            "train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss, "val_acc": val_acc,
            "epoch_time_s": time.time() - t_epoch, "time_s": time.time() - t_start,
        }
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            append_log(output, result)
            save_checkpoint(output / "last.pth", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "best_acc": best_acc,
                "args": vars(args),
            })
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
