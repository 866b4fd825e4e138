#!/usr/bin/env python3
"""Print the fault matrix: every row of balancerd.lab.faults on a fresh 3-host lab.

    sudo .venv/bin/python scripts/fault_matrix.py [--rows a,b] [--write docs/faults.md]

Needs root and the lab's packages (scripts/setup.sh). Exit status 0 when every row holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from balancerd.lab.cluster import Lab, LabSpec
from balancerd.lab.faults import ROWS, run_row, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--write", default="", help="also write the table into this file")
    parser.add_argument("--lab-dir", default="/tmp/balancerd-fault-matrix")
    args = parser.parse_args()
    names = [n for n in args.rows.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"unknown rows: {unknown}; known: {list(ROWS)}", file=sys.stderr)
        return 2
    root = Path(args.lab_dir)
    if (root / "lab.json").exists():
        Lab(root).down()
    lab = Lab(root, "bfm", "10.77.8")
    lab.up(LabSpec(hosts=3, guests=(), host_cpus=2))
    results = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="balancerd-faults-") as tmp:
            for name in names:
                print(f"row {name} ...", file=sys.stderr, flush=True)
                r = run_row(lab, name, Path(tmp) / name)
                print(
                    f"row {name}: {'holds' if r.holds else 'BROKEN'} ({r.seconds:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(r)
    finally:
        lab.down()
    text = table(results)
    print(text)
    held = sum(r.holds for r in results)
    summary = f"{held} of {len(results)} rows hold ({time.monotonic() - started:.0f} s)"
    print(summary)
    if args.write:
        Path(args.write).write_text(
            "# Fault matrix\n\nPrinted by `sudo .venv/bin/python scripts/fault_matrix.py "
            f"--write {args.write}` on the lab (real libvirtd + QEMU).\n\n{text}\n\n{summary}\n"
        )
    return 0 if held == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
