"""Preflight and `balancerd migrate` of a refused guest on the real lab, with a baseline.

  flock /tmp/balancerd-lab.lock .venv/bin/python benchmarks/bench_preflight.py [--reps 5]

Lab "bpf" (10.77.41.0/24), two hosts; guest ``wb`` has a shared disk with
cache='writeback' (preflight must refuse it), guest ``ok`` a shared disk with cache='none'
(preflight passes). Rows:

  refused, first    `balancerd migrate wb host2 --json` end to end (a new process: imports,
                    config, connections, reconcile, find the guest, preflight) right after
                    `lab up`, before anything asked the libvirtds for their capabilities
  first caps        `virsh capabilities` per host, the first ever: what every first
                    connection paid (one host after the other) before they were read lazily
  baseline          `virsh hostname` round trip: what a warm host answers in
  refused, warm     the migrate again, median
  refused, restart  the same right after both libvirtds restarted
  status/plan       `status --json` and `plan --json`: sampled as before (3 samples 1 s
                    apart: the baseline), one-shot without a daemon, from a running daemon
  passing, warm     preflight() of ``ok`` in process, per step, median

Targets (issue 14): refused migrate <= 3 s warm, passing preflight <= 1 s, plan and
status about a second on warm hosts. With
``--write`` the table replaces its section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from balancerd.config import load_config
from balancerd.execute.preflight import preflight
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.model import Move
from balancerd.policy.model import Migration
from balancerd.wiring import open_hypervisor

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
START = "<!-- bench_preflight: start -->"
END = "<!-- bench_preflight: end -->"
COMMAND = "flock /tmp/balancerd-lab.lock .venv/bin/python benchmarks/bench_preflight.py --write"
SPEC = LabSpec(
    hosts=2,
    guests=(
        GuestSpec("wb", "host1", disk="shared", disk_cache="writeback"),
        GuestSpec("ok", "host1", disk="shared"),
    ),
    metrics_listen="127.0.0.1:9291",
)


def timed(fn: object) -> float:
    t = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - t


def virsh(lab: Lab, host: str, *args: str) -> None:
    argv = ["virsh", "-q", "-c", lab.host_uri(host), *args]
    subprocess.run(argv, capture_output=True, check=True)


def migrate_refused(config: Path) -> tuple[float, dict[str, float], str]:
    """(end-to-end seconds, preflight seconds per step, skip kind) of one CLI run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "balancerd.cli", "migrate", "--config", str(config)]
    t = time.monotonic()
    p = subprocess.run([*argv, "wb", "host2", "--json"], capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - t
    if p.returncode != 1:
        raise SystemExit(f"migrate wb: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    result = json.loads(p.stdout)[0]
    return elapsed, result["preflight_s"], result["skip_kind"]


def cli(config: Path, *args: str) -> tuple[float, dict[str, object]]:
    """(seconds, JSON) of one `balancerd ARGS --config CONFIG --json` in a new process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "balancerd.cli", *args, "--config", str(config), "--json"]
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - t
    if p.returncode != 0:
        raise SystemExit(f"{args}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return elapsed, json.loads(p.stdout)


def snapshot_rows(config: Path) -> list[tuple[str, str, str]]:
    """`status` and `plan`: sampled as before (3 samples 1 s apart, the old default), one-shot
    without a daemon, and from a running daemon's snapshot."""
    rows = []
    for cmd in ("status", "plan"):
        for label, extra in (
            ("3 samples 1 s apart (the old default)", ("--samples", "3", "--interval", "1")),
            ("no daemon", ()),
        ):
            t, out = cli(config, cmd, *extra)
            kind = out["snapshot"]["kind"]  # type: ignore[index]
            rows.append((f"`{cmd} --json`, {label}", f"snapshot: {kind}", f"{t:.2f} s"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "balancerd.cli", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while cli(config, "status")[1]["snapshot"]["kind"] != "daemon":  # type: ignore[index]
            if time.monotonic() > deadline:
                raise SystemExit("the daemon never served a snapshot")
            time.sleep(1)
        for cmd in ("status", "plan"):
            t, out = cli(config, cmd)
            kind = out["snapshot"]["kind"]  # type: ignore[index]
            rows.append((f"`{cmd} --json`, daemon running", f"snapshot: {kind}", f"{t:.2f} s"))
    finally:
        daemon.terminate()
        daemon.wait(60)
    return rows


def restart_libvirtds(lab: Lab) -> None:
    for h in lab.host_names():
        lab.kill_libvirtd(h)
        lab.start_libvirtd(h)


def steps(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in d.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-bpf"))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    lab = Lab(args.dir / "lab", "bpf", "10.77.41")
    rows: list[tuple[str, str, str]] = []
    try:
        config_path = lab.up(SPEC)
        for g in SPEC.guests:
            lab.wait_booted(g.name)
        # First contact: nothing has asked these libvirtds for their capabilities yet.
        first = migrate_refused(config_path)
        rows.append(
            (
                "`migrate wb host2 --json`, refused, first contact after `lab up`",
                f"{first[2]}: {steps(first[1])}",
                f"{first[0]:.2f} s",
            )
        )
        caps = [timed(lambda h=h: virsh(lab, h, "capabilities")) for h in lab.host_names()]
        rows.append(
            (
                "first `virsh capabilities` per host after `lab up` (every first connection "
                "paid it before, one host after the other)",
                " + ".join(f"{c:.2f} s" for c in caps),
                f"{sum(caps):.2f} s",
            )
        )
        base = [timed(lambda h=h: virsh(lab, h, "hostname")) for h in lab.host_names()]
        rows.append(("baseline: `virsh hostname`, slowest host", "", f"{max(base):.3f} s"))

        warm = [migrate_refused(config_path) for _ in range(args.reps)]
        med = statistics.median(w[0] for w in warm)
        last = warm[-1]
        rows.append(
            (
                f"`migrate wb host2 --json`, refused, warm (median of {args.reps})",
                f"{last[2]}: {steps(last[1])}",
                f"{med:.2f} s (target <= 3 s)",
            )
        )

        restart_libvirtds(lab)
        again = migrate_refused(config_path)
        rows.append(
            (
                "`migrate wb host2 --json`, refused, both libvirtds just restarted",
                f"{again[2]}: {steps(again[1])}",
                f"{again[0]:.2f} s",
            )
        )

        rows += snapshot_rows(config_path)

        config = load_config(config_path)
        hv = open_hypervisor(config)
        try:
            hv.sample_all()  # connections open, capabilities read
            move = Move(vm="ok", src="host1", dst="host2", mem_bytes=0, expected_s=0.0)
            runs = [preflight(hv, move, Migration(), 0) for _ in range(args.reps)]
        finally:
            hv.close()
        if not all(r.ok for r in runs):
            raise SystemExit(f"preflight of ok refused: {runs[0].reason}")
        per_step = {
            c.check: statistics.median(r.timings[i].elapsed_s for r in runs)
            for i, c in enumerate(runs[0].timings)
        }
        total = statistics.median(sum(c.elapsed_s for c in r.timings) for r in runs)
        rows.append(
            (
                f"preflight of `ok` (passes), warm, in process (median of {args.reps})",
                steps(per_step),
                f"{total:.3f} s (target <= 1 s)",
            )
        )
    finally:
        lab.down()

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table = "\n".join(
        [
            "## Preflight and a refused `migrate` (`benchmarks/bench_preflight.py`)",
            "",
            f"Issue 14, on the lab (two hosts, TCG guests). Run {stamp}. Reproduce with:",
            "",
            f"    {COMMAND}",
            "",
            "| what | preflight steps | time |",
            "|---|---|---|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        ]
    )
    print(table)
    if args.write:
        text = DOC.read_text()
        section = f"{START}\n{table}\n{END}"
        if START in text:
            head, rest = text.split(START, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        DOC.write_text(text)


if __name__ == "__main__":
    main()
