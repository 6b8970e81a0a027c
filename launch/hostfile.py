"""Write a DeepSpeed hostfile for the current Slurm allocation.

    python -m launch.hostfile [--slots N] [--out hostfile]
    deepspeed --hostfile hostfile pretrain/main.py --config ...

One line `<host> slots=<N>` per node of SLURM_JOB_NODELIST; N defaults to the GPUs per node
Slurm granted (SLURM_GPUS_ON_NODE), else the tasks per node.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.env import expand_nodelist


def hostfile_lines(nodelist: str, slots: int) -> list[str]:
    return [f"{host} slots={slots}" for host in expand_nodelist(nodelist)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.hostfile", description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=0, help="processes per node (default: from Slurm)")
    ap.add_argument("--out", default="-", help="file to write, - for stdout")
    args = ap.parse_args(argv)
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        print("error: SLURM_JOB_NODELIST is not set; run inside a Slurm allocation", file=sys.stderr)
        return 2
    slots = args.slots or int(os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    text = "\n".join(hostfile_lines(nodelist, slots)) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
