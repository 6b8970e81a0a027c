"""Demo data: scikit-learn's bundled handwritten digits as a class-per-folder image tree.

    python -m pretrain.data.digits --out DIR

1,797 real 8x8 scans of the digits 0-9, upscaled to 32x32 RGB PNG files under
`DIR/<digit>/<index>.png`. Small enough to train on a laptop in minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out: Path, size: int = 32) -> int:
    """Write every digit image under out/<digit>/; return the number of images."""
    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        gray = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        image = gray.resize((size, size), Image.BICUBIC).convert("RGB")
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.png")
    return len(digits.target)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.data.digits", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    n = write_digits(args.out, args.size)
    print(f"wrote {n} digit images to {args.out}")


if __name__ == "__main__":
    main()
