"""Train the digit classifier behind ``gan_fast.eval``'s offline metric and ship its weights.

    python tools/train_digit_classifier.py [--out gan_fast/assets/digit_classifier.pt]

Deterministic and CPU-only (one thread, seeded, deterministic algorithms: the same weights bit for bit
on the same machine; under a minute). It trains on the fixed 80% of the embedded digits named by
``gan_fast.classifier.digits_split`` and prints the accuracy on the held-out 20%, which
gan_fast/assets/README.md records. Retraining changes the features, so every published digits FD
(docs/quality.md) must be remeasured with the new weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gan_fast.classifier import DigitClassifier, WEIGHTS_NAME, digits_split  # noqa: E402
from gan_fast.datasets import load_digits, to_model_input  # noqa: E402

SEED = 0
EPOCHS = 30
BATCH = 64
LR = 2e-3
SHIFT = 2  # random translations of up to 2 px: generated digits are not all centred like the scans


def shifted(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in [-SHIFT, SHIFT], background (-1) filling the border."""
    n, _, h, w = x.shape
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "gan_fast", "assets", WEIGHTS_NAME))
    args = p.parse_args()

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a fixed reduction order: the same weights whatever the core count
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)

    images, labels = load_digits(32, 1)
    x, y = to_model_input(images), labels
    train_idx, heldout_idx = (torch.from_numpy(i) for i in digits_split(len(y)))
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[heldout_idx], y[heldout_idx]

    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps_per_epoch = len(y_train) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            loss = F.cross_entropy(model(shifted(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}/{EPOCHS}: loss {loss.item():.4f}, "
                  f"held-out accuracy {accuracy(model, x_test, y_test):.4f}")

    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    # fp16 storage halves the file; the metric computes in fp32 and its reference values
    # (docs/quality.md) are measured with exactly these rounded weights
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "heldout_accuracy": test_acc, "train_accuracy": train_acc,
                "n_train": len(y_train), "n_heldout": len(y_test), "seed": SEED, "epochs": EPOCHS},
               args.out)
    # the accuracy of the weights as shipped (rounded to fp16)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    shipped = accuracy(model, x_test, y_test)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train accuracy {train_acc:.4f} ({len(y_train)} digits), held-out accuracy {test_acc:.4f} "
          f"({len(y_test)} digits; {shipped:.4f} with the fp16 weights)")
    print(f"wrote {args.out}: {n_params} parameters, {os.path.getsize(args.out) / 1024:.0f} KB, "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
