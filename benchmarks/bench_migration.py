"""Migration engine on the real lab: downtime and total time per mode, and evacuation time.

  sudo .venv/bin/python benchmarks/bench_migration.py [--reps 2] [--dir /tmp/bench-bl2]

Part 1, one guest that rewrites 96 of its 256 MiB (bandwidth capped at 50 MiB/s), moved
back and forth with each mode:
  live             the ladder without pausing (downtime steps up to 4 s; abort if it still
                   does not converge) - what a balancer without pause-and-complete gets
  pause-complete   the ladder ending in pause-and-complete (the engine's default answer)
  cold             non-live: paused while all memory is sent (the baseline)
and a quiet 256 MiB guest, live and cold, for reference.
Part 2: evacuation of a host with 4 quiet guests to two others at 1 vs 2 concurrent
migrations (1 is the baseline).

Downtime is libvirt's figure (source stopped -> destination resumed); total is the whole
step as the executor sees it (preflight, migration, verification). Lab "bl2", 10.77.2.0/24.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from balancerd.config import load_config
from balancerd.execute.executor import execute
from balancerd.execute.journal import Journal
from balancerd.execute.move import MIGRATED, Engine, MoveResult, run_move
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.model import Move
from balancerd.policy.model import Migration
from balancerd.wiring import open_hypervisor

MODES = {
    "live": Migration(
        bandwidth_mib_s=50,
        max_downtime_ms=300,
        downtime_steps_ms=(500, 1000, 2000, 4000),
        auto_converge=False,
        on_stall="abort",
        stall_samples=3,
        max_time_s=120,
    ),
    "pause-complete": Migration(
        bandwidth_mib_s=50,
        max_downtime_ms=50,
        downtime_steps_ms=(100,),
        auto_converge=False,
        stall_samples=3,
        max_time_s=240,
    ),
    "cold": Migration(bandwidth_mib_s=50, max_time_s=240),
}
EVAC_GUESTS = 4


@dataclass
class Row:
    guest: str
    mode: str
    results: list[MoveResult]

    def cells(self) -> list[str]:
        ok = [r for r in self.results if r.outcome == MIGRATED]
        dt = [r.downtime_ms for r in ok if r.downtime_ms is not None]
        total = [r.seconds for r in ok]
        modes = sorted({r.mode for r in ok})
        return [
            self.guest,
            self.mode,
            f"{len(ok)}/{len(self.results)}",
            f"{statistics.median(dt):.0f}" if dt else "-",
            f"{min(dt):.0f}-{max(dt):.0f}" if dt else "-",
            f"{statistics.median(total):.1f}" if total else "-",
            ",".join(modes) or "; ".join(sorted({r.reason[:60] for r in self.results})),
        ]


def move_once(hv: LibvirtHypervisor, lab: Lab, state: str, vm: str, mode: str) -> MoveResult:
    src = lab.guest_host(vm)
    assert src is not None
    dst = "host2" if src == "host1" else "host1"
    engine = Engine(hv=hv, mig=MODES[mode], journal=Journal(state), live=(mode != "cold"))
    r = run_move(engine, Move(vm, src, dst, 0, 0.0))
    print(f"  {r.line()}", flush=True)
    return r


def evacuate(hv: LibvirtHypervisor, lab: Lab, state: str, concurrent: int) -> float:
    names = [f"e{i}" for i in range(1, EVAC_GUESTS + 1)]
    moves = [
        Move(n, "host1", "host2" if i % 2 == 0 else "host3", 0, 0.0) for i, n in enumerate(names)
    ]
    mig = Migration(bandwidth_mib_s=100, max_concurrent=concurrent, max_concurrent_per_host=2)
    t0 = time.monotonic()
    results = execute(moves, Engine(hv=hv, mig=mig, journal=Journal(state)))
    elapsed = time.monotonic() - t0
    for r in results:
        print(f"  {r.line()}", flush=True)
    if any(r.outcome != MIGRATED for r in results):
        raise SystemExit("evacuation failed; see above")
    back = [Move(m.vm, m.dst, "host1", 0, 0.0) for m in moves]
    execute(
        back,
        Engine(
            hv=hv, mig=Migration(bandwidth_mib_s=200, max_concurrent=2, max_concurrent_per_host=2)
        ),
    )
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/bench-bl2")
    args = ap.parse_args()
    lab = Lab(Path(args.dir), "bl2", "10.77.2")
    # Part 1 runs with only its two guests: every other TCG guest steals CPU from the
    # dirtying one, which then dirties too little and converges live after all.
    guests = [
        GuestSpec("bdirty", "host1", mem_mib=256, dirty_mib=96),
        GuestSpec("bquiet", "host1", mem_mib=256),
    ]
    evac_guests = [GuestSpec(f"e{i}", "host1", mem_mib=256) for i in range(1, EVAC_GUESTS + 1)]
    try:
        config_path = lab.up(
            LabSpec(hosts=3, guests=tuple(guests), metrics_listen="127.0.0.1:9283")
        )
        for g in guests:
            lab.wait_booted(g.name)
        for h in lab.host_names():
            subprocess.run(
                ["virsh", "-q", "-c", lab.host_uri(h), "capabilities"],
                capture_output=True,
                timeout=120,
                check=False,
            )
        console = lab.console_log("bdirty")
        while "dirtied 96 MiB 1000 times" not in console.read_text(errors="replace"):
            time.sleep(0.5)  # let the dirtying guest get going
        config = load_config(config_path)
        hv = open_hypervisor(config)
        rows: list[Row] = []
        for vm, modes in (
            ("bdirty", ("live", "pause-complete", "cold")),
            ("bquiet", ("live", "cold")),
        ):
            for mode in modes:
                print(f"{vm} {mode}:", flush=True)
                rows.append(
                    Row(
                        vm,
                        mode,
                        [move_once(hv, lab, config.state_dir, vm, mode) for _ in range(args.reps)],
                    )
                )
        for g in guests:
            lab.destroy_guest(g.name)
        for g in evac_guests:
            lab.start_guest(g)
        for g in evac_guests:
            lab.wait_booted(g.name)
        evac: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.reps):
            for n in (1, 2):
                print(f"evacuate host1 ({EVAC_GUESTS} guests), {n} at a time:", flush=True)
                evac[n].append(evacuate(hv, lab, config.state_dir, n))
        hv.close()
        # libvirt objects still referenced (e.g. from exception tracebacks) keep their
        # connection; freed at exit after `lab.down()` their close RPC waits forever on a
        # peer whose network is gone. Free them while the hosts still answer.
        gc.collect()
    finally:
        lab.down()

    print()
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores shared; TCG guests)")
    head = ["guest", "mode", "ok", "downtime ms (median)", "range", "total s", "modes seen"]
    table = [head] + [r.cells() for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    dirty = {r.mode: r for r in rows if r.guest == "bdirty"}

    def med(row: Row, mode: str) -> float | None:
        dts = [
            x.downtime_ms
            for x in row.results
            if x.outcome == MIGRATED and x.mode == mode and x.downtime_ms
        ]
        return statistics.median(dts) if dts else None

    pc, cold = med(dirty["pause-complete"], "paused-fallback"), med(dirty["cold"], "offline")
    if pc and cold:
        print(f"pause-and-complete / cold downtime (same guest): {pc / cold:.2f}")
    else:
        print("no paused-fallback run to compare (the guest converged live: machine too busy?)")
    one, two = statistics.median(evac[1]), statistics.median(evac[2])
    print(
        f"evacuation of {EVAC_GUESTS} x 256 MiB: 1 at a time {one:.1f} s, "
        f"2 at a time {two:.1f} s, speed-up {one / two:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
