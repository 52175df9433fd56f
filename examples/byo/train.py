"""Train the example's own network on scikit-learn's bundled digits, the way a user would before
bringing it to shrinkflow: the digits are written out as an image folder (``images/train`` and
``images/test``; the model never sees ``test``), the network is trained on ``train`` and its plain
state dict saved to ``weights.pt``. Offline, a minute or two on one core.

    python train.py            # from examples/byo/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from models.tinynet import build
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
MEAN, STD = 0.5, 0.5  # what this network's training used; params.yaml declares the same (model.input)


def write_folder(root: Path, test_size: float = 0.5, seed: int = 0) -> None:
    """``root/{train,test}/<digit>/<n>.png``: 8x8 grey images, 0-16 scaled to 0-255; half held out,
    so that shrinkflow has enough never-seen images to certify a smaller model on."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    idx = np.arange(len(images))
    train, test = train_test_split(idx, test_size=test_size, stratify=digits.target, random_state=seed)
    for split, rows in (("train", train), ("test", test)):
        for i in rows:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")


def read_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(root.glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f), dtype=np.float32) / 255 for f in files])[:, None]
    y = np.array([int(f.parent.name) for f in files])
    return (torch.from_numpy(x) - MEAN) / STD, torch.from_numpy(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "images")
    parser.add_argument("--out", type=Path, default=HERE / "weights.pt")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument(
        "--seed", type=int, default=0, help="the split into train/test and the training's draws"
    )
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        write_folder(args.data, seed=args.seed)
    torch.manual_seed(args.seed)
    # One thread: this network's convolutions are too small to split; on two cores, two threads
    # took about 6 times the CPU time of one (and 5 times the wall time on a busy machine).
    torch.set_num_threads(1)
    x, y = read_split(args.data / "train")
    model = build(width=args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * -(-len(x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            schedule.step()
    model.eval()
    xt, yt = read_split(args.data / "test")
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    torch.save(model.state_dict(), args.out)
    print(
        f"trained {args.epochs} epochs on {len(x)} images; test accuracy {100 * acc:.1f}%; saved {args.out}"
    )


if __name__ == "__main__":
    main()
