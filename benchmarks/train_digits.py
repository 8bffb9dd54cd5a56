"""Train a small ConvNeXt from scratch on scikit-learn's 8x8 digits, eager and fused side by side.

The 1797 digit images (shipped inside scikit-learn) are upsampled to 32x32, split 80/20 into a
training and a held-out set (stratified, fixed seed), and a 4-stage ConvNeXt (hidden sizes
16/32/48/64, depths 1/1/2/1, patch 2: maps 16x16 -> 2x2) is trained with AdamW from one shared
initialization, once through the eager ops and once through the fused Triton kernels.
Writes digits_epochs.csv (per epoch: mean training loss, held-out loss and accuracy),
digits_steps.csv (per step training loss) and digits_curves.png.

On a GPU both curves run in full. On a CPU the fused kernels only run in Triton's interpreter
(measured on 2 cores: about 70 s for one training step at batch 8), so there the fused curve needs a
GPU: by default a CPU run trains the eager curve only; `--fused-steps K` adds the first K fused steps
on the same batches from the same initialization (use a small --batch-size), enough to see the two
training losses agree.

    python benchmarks/train_digits.py --epochs 12 --out results/
    python benchmarks/train_digits.py --epochs 1 --batch-size 4 --train-examples 64 --fused-steps 2  # CPU check
"""
from __future__ import annotations

import argparse
import copy
import csv
import functools
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # The fused curve on CPU is Triton's interpreter; chosen before the kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastconvnext  # noqa: E402

IMAGE_SIZE = 32
NUM_CLASSES = 10
say = functools.partial(print, flush=True)


def load_digits(seed=0, heldout_fraction=0.2, train_examples=None):
    """(train_x, train_y, heldout_x, heldout_y): [N, 1, 32, 32] float in [-1, 1], int64 labels.

    train_examples keeps only the first that many (shuffled) training examples, for quick runs.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images * 2.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, heldout_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=heldout_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, heldout_idx = torch.from_numpy(train_idx[:train_examples]), torch.from_numpy(heldout_idx)
    return images[train_idx], labels[train_idx], images[heldout_idx], labels[heldout_idx]


def build_model(drop_path_rate=0.05, seed=0):
    config = fastconvnext.ConvNextConfig(
        num_channels=1, patch_size=2, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1],
        num_labels=NUM_CLASSES, drop_path_rate=drop_path_rate, image_size=IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    return fastconvnext.ConvNextForImageClassification(config)


def batches(num_examples, batch_size, epoch, seed):
    """The shuffled index batches of one epoch: the same for every backend."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def make_optimizer(model, lr, total_steps, weight_decay=0.05, warmup_steps=10):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@torch.no_grad()
def evaluate(model, images, labels, backend, batch_size=256):
    model.eval()
    total_loss, correct = 0.0, 0
    with fastconvnext.use_backend(backend):
        for start in range(0, len(labels), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            logits = model(x).logits
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return total_loss / len(labels), correct / len(labels)


def train(model, data, backend, epochs, batch_size, lr, seed, max_steps=None, device="cpu", log=say):
    """Train in place; returns (per-epoch rows, per-step losses). Stops after max_steps steps if given."""
    train_x, train_y, heldout_x, heldout_y = (t.to(device) for t in data)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    optimizer, scheduler = make_optimizer(model, lr, epochs * steps_per_epoch)
    epoch_rows, step_losses = [], []
    model.train()
    torch.manual_seed(seed)  # drop-path masks: the same draws for every backend
    for epoch in range(epochs):
        started, losses = time.perf_counter(), []
        for index in batches(len(train_y), batch_size, epoch, seed):
            index = index.to(device)
            with fastconvnext.use_backend(backend):
                loss = model(train_x[index], labels=train_y[index]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step_losses.append(loss.item())
            if max_steps is not None and len(step_losses) >= max_steps:
                return epoch_rows, step_losses
        heldout_loss, accuracy = evaluate(model, heldout_x, heldout_y, backend)
        row = {
            "backend": backend, "epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
            "heldout_loss": heldout_loss, "heldout_accuracy": accuracy, "seconds": time.perf_counter() - started,
        }
        epoch_rows.append(row)
        log(
            f"[{backend}] epoch {epoch + 1:2d}  train loss {row['train_loss']:.4f}  held-out loss {heldout_loss:.4f}"
            f"  held-out accuracy {accuracy:.1%}  ({row['seconds']:.1f} s)"
        )
    return epoch_rows, step_losses


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path, epoch_rows, step_rows, fused_note):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for backend, style, color in (("eager", "-", "C0"), ("fused", "--", "C1")):
        steps = [r for r in step_rows if r["backend"] == backend]
        if steps:
            ax_steps.plot([r["step"] for r in steps], [r["loss"] for r in steps], style, color=color, label=backend)
        epochs = [r for r in epoch_rows if r["backend"] == backend]
        if epochs:
            x = [r["epoch"] for r in epochs]
            ax_acc.plot(x, [r["heldout_accuracy"] for r in epochs], style + "o", color=color,
                        label=f"{backend} accuracy")
            ax_acc.plot(x, [r["heldout_loss"] for r in epochs], style + "x", color=color, alpha=0.6,
                        label=f"{backend} loss")
    ax_steps.set(xlabel="step", ylabel="training loss", title="training loss per step")
    ax_acc.set(xlabel="epoch", title="held-out set (20% of digits)")
    ax_steps.legend()
    ax_acc.legend()
    if fused_note:
        fig.suptitle(fused_note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--drop-path-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=None, help="train on a subset (quick runs)")
    parser.add_argument(
        "--fused-steps", type=int, default=None,
        help="fused run length in steps (default: the whole run on a GPU, none on a CPU; 0 skips it)",
    )
    parser.add_argument("--out", default=".", help="directory for the CSV files and the plot")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_steps = args.fused_steps if args.fused_steps is not None else (None if device == "cuda" else 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(args.seed, train_examples=args.train_examples)
    initial = build_model(args.drop_path_rate, args.seed).to(device)
    say(f"{len(data[1])} training / {len(data[3])} held-out digits at {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"{initial.num_parameters()} parameters, device {device}")

    runs = {"eager": None} if fused_steps == 0 else {"eager": None, "fused": fused_steps}
    if fused_steps == 0 and device == "cpu" and args.fused_steps is None:
        say("no GPU: training the eager curve only; the fused curve needs a GPU (or see --fused-steps)")
    epoch_rows, step_rows = [], []
    for name, max_steps in runs.items():
        model = copy.deepcopy(initial)
        backend = "eager" if name == "eager" else "triton"
        rows, losses = train(model, data, backend, args.epochs, args.batch_size, args.lr, args.seed, max_steps,
                             device)
        epoch_rows += [dict(row, backend=name) for row in rows]
        step_rows += [{"backend": name, "step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
        if max_steps is not None and name == "fused":
            eager_losses = [r["loss"] for r in step_rows if r["backend"] == "eager"][: len(losses)]
            gap = max(abs(a - b) for a, b in zip(losses, eager_losses))
            why = " (layer scale starts at 1e-6: early on, the blocks move the loss by less than its rounding)"
            say(f"[fused] first {len(losses)} steps, losses {[round(v, 4) for v in losses]}; "
                f"max |fused - eager| = {gap:.2e}{why if gap == 0 else ''}")

    write_csv(out / "digits_epochs.csv", epoch_rows)
    write_csv(out / "digits_steps.csv", step_rows)
    note = None
    if fused_steps is not None and "fused" in runs:
        note = f"fused curve: first {fused_steps} steps only (CPU: Triton interpreter); the full fused run needs a GPU"
    if not args.no_plot:
        plot(out / "digits_curves.png", epoch_rows, step_rows, note)
    return {"epochs": epoch_rows, "steps": step_rows}


if __name__ == "__main__":
    main(sys.argv[1:])
