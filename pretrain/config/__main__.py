"""`python -m pretrain.config`: the config reference, or the run directory of a config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_config, reference_markdown, write_readme_reference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.config",
                                 description="Print the config reference, or facts of a config.")
    ap.add_argument("--readme", type=Path, help="rewrite the config reference section of this README")
    ap.add_argument("--run-dir", action="store_true", help="print the run directory of --config with --set")
    ap.add_argument("--config", help="YAML config (for --run-dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    if args.readme:
        write_readme_reference(args.readme)
    elif args.run_dir:
        try:
            print(load_config(args.config, args.overrides).run_dir)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    else:
        print(reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
