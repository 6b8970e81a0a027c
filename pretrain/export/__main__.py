"""`python -m pretrain.export`: see the package's docstring and README "Export and fine-tuning"."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.export.exported import ExportError
from pretrain.export.run import FORMATS, export_run
from pretrain.train.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export",
                                 description="Export a trained run for timm, transformers or the official layout.")
    ap.add_argument("--run", type=Path, required=True, help="run directory (output_dir/name)")
    ap.add_argument("--out", type=Path, required=True,
                    help="output directory (with several formats, each goes to OUT/<format>)")
    ap.add_argument("--format", nargs="+", default=["timm"], choices=list(FORMATS), dest="formats",
                    help="formats to write (default: timm)")
    ap.add_argument("--headless", action="store_true",
                    help="drop the classifier head (SimMIM: the encoder without mask token and decoder)")
    ap.add_argument("--tag", default=None, help="checkpoint tag to export (default: latest)")
    ap.add_argument("--head-subset", default=None, metavar="imagenet1k|FILE",
                    help="keep only these classes' classifier rows, in this order: timm's 1,000 ImageNet-1K "
                         "synsets, or a file of class names, one per line")
    args = ap.parse_args(argv)
    command = ["python", "-m", "pretrain.export", *(sys.argv[1:] if argv is None else argv)]
    try:
        written = export_run(args.run, args.out, args.headless, args.tag, args.head_subset, args.formats, command)
    except (ExportError, ConfigError, CheckpointError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(f"exported {w.fmt} to {w.out_dir} ({', '.join(w.files)}; outputs match the trained model "
              f"to {w.max_diff:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
