"""Collection at scale through libvirt's test driver: 1,000 hosts beside 100, same run.

    .venv/bin/python benchmarks/bench_collect.py [--sizes 100,1000] [--guests 20]
        [--cycles 120] [--failing 1000]

Each size runs in its own process (its RSS is its own): node files for N hosts x G guests
(``test:///path/hN.xml``, real libvirt-python calls, no libvirtd), a daemon config naming
them, and the daemon's own collect job (``Daemon.collect_once``: every host sampled by the
adapter's workers, the Snapshot built, capacity, power and demand history, metrics, the
status file) run ``--cycles`` times back to back with the same objects: 120 cycles are an
hour of 30 s collect intervals (the daemon's clock is stepped 30 s per cycle, so what it
keeps per interval grows as in that hour). Printed: the first cycle (it connects), seconds
per cycle after it (median, p95), RSS at start, after the first cycle and after the last,
and the test driver's own share: its fake hosts live inside this process (~115 KiB each),
where a real daemon's hosts live in their libvirtd; measured alone in a bare process.

The issue's case: ``balancerd status --json`` over ``--failing`` hosts whose connections
are all refused at once (qemu+tcp to port 1 of 127.0.x.y), wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, print_table  # noqa: E402
from benchmarks.testdriver import write_nodes  # noqa: E402

POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: bench-collect}
spec:
  objective: balance
  mode: recommend
"""


def write_config(folder: Path, hosts: list[tuple[str, str]]) -> Path:
    (folder / "policy.yaml").write_text(POLICY)
    lines = "".join(f"  - {{name: {name}, uri: '{uri}'}}\n" for name, uri in hosts)
    config = folder / "balancerd.yaml"
    config.write_text(
        "hosts:\n"
        + lines
        + textwrap.dedent(
            f"""\
            policy: policy.yaml
            state_dir: {folder / "state"}
            collect_interval_s: 30
            smoothing_window: 4
            """
        )
    )
    return config


def proc_status() -> dict[str, int]:
    """VmRSS/VmHWM in KiB and the thread count of this process."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def run_collect(hosts: int, guests: int, cycles: int, interval_s: float) -> dict[str, Any]:
    """In this process: the daemon's collect job over ``hosts`` test-driver hosts. The
    daemon's clock advances ``interval_s`` per cycle, so what it keeps per interval (demand
    history, power state) grows as over ``cycles`` real intervals."""
    from balancerd.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        folder = Path(tmp)
        config = write_config(folder, write_nodes(folder / "nodes", hosts, guests))
        clock = [0.0]
        daemon = Daemon(str(config), serve_metrics=False, control_socket="", clock=lambda: clock[0])
        before = proc_status()
        t0 = time.perf_counter()
        snap = daemon.collect_once()
        first_s = time.perf_counter() - t0
        after_first = proc_status()
        up = sum(h.up for h in snap.hosts)
        times = []
        for _ in range(cycles):
            clock[0] += interval_s
            t0 = time.perf_counter()
            snap = daemon.collect_once()
            times.append(time.perf_counter() - t0)
        end = proc_status()
        daemon.rt.hypervisor.close()
        return {
            "hosts": hosts,
            "guests": len(snap.vms),
            "up": up,
            "up_end": sum(h.up for h in snap.hosts),
            "first_s": first_s,
            "median_s": statistics.median(times),
            "p95_s": sorted(times)[max(0, round(0.95 * len(times)) - 1)],
            "rss_start_mib": before["VmRSS"] / 1024,
            "rss_first_mib": after_first["VmRSS"] / 1024,
            "rss_end_mib": end["VmRSS"] / 1024,
            "peak_mib": end["VmHWM"] / 1024,
            "threads": end["Threads"],
        }


def run_fake_hosts(hosts: int, guests: int) -> dict[str, Any]:
    """What the test driver's in-process hosts cost by themselves: RSS growth of opening the
    same node files in a bare process (with a real libvirtd each host's state lives there,
    not in balancerd)."""
    import libvirt

    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        nodes = write_nodes(Path(tmp), hosts, guests)
        before = proc_status()["VmRSS"]
        conns = [libvirt.open(uri) for _, uri in nodes]
        for conn in conns:
            conn.getCapabilities()
            conn.getAllDomainStats(0, 0)
        grown = proc_status()["VmRSS"] - before
        for conn in conns:
            conn.close()
        return {"hosts": hosts, "fake_hosts_mib": grown / 1024}


def run_status_failing(hosts: int) -> dict[str, Any]:
    """``balancerd status --json`` over ``hosts`` refused connections, in a child process."""
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        folder = Path(tmp)
        # one loopback address each (a config names each URI once); port 1 refuses at once
        uris = [
            (f"h{i:04d}", f"qemu+tcp://127.0.{i // 250}.{i % 250 + 1}:1/system")
            for i in range(hosts)
        ]
        config = write_config(folder, uris)
        cmd = [sys.executable, "-m", "balancerd.cli", "status", "--config", str(config)]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=False)
        wall_s = time.perf_counter() - t0
        down = sum(not h["up"] for h in json.loads(proc.stdout)["hosts"]) if proc.stdout else -1
        return {
            "hosts": hosts,
            "down": down,
            "exit": proc.returncode,
            "wall_s": wall_s,
            "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }


def child(args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON line is the result."""
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="host counts, comma-separated")
    parser.add_argument("--guests", type=int, default=20, help="guests per host")
    parser.add_argument("--cycles", type=int, default=120, help="collect cycles after the first")
    parser.add_argument(
        "--interval", type=float, default=30.0, help="daemon clock step per cycle (s)"
    )
    parser.add_argument("--failing", type=int, default=1000, help="refused hosts for status")
    parser.add_argument("--child", choices=("collect", "fake", "status"), help=argparse.SUPPRESS)
    parser.add_argument("--hosts", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "collect":
        print(json.dumps(run_collect(args.hosts, args.guests, args.cycles, args.interval)))
        return
    if args.child == "fake":
        print(json.dumps(run_fake_hosts(args.hosts, args.guests)))
        return
    if args.child == "status":
        print(json.dumps(run_status_failing(args.hosts)))
        return
    print(command_line())
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        size = ["--hosts", str(n), "--guests", str(args.guests)]
        r = child(
            ["collect", *size, "--cycles", str(args.cycles), "--interval", str(args.interval)]
        )
        fake = child(["fake", *size])
        if "error" in r or "error" in fake:
            rows.append([f"{n} x {args.guests}", f"error: {r.get('error', fake.get('error'))}"])
            rows[-1] += [""] * 9
            continue
        rows.append(
            [
                f"{n} x {args.guests}",
                f"{r['up_end']}/{r['hosts']}, {r['guests']}",
                f"{r['first_s']:.2f}",
                f"{r['median_s']:.3f}",
                f"{r['p95_s']:.3f}",
                f"{r['rss_start_mib']:.0f}",
                f"{r['rss_first_mib']:.0f}",
                f"{r['rss_end_mib']:.0f}",
                f"{fake['fake_hosts_mib']:.0f}",
                f"{r['rss_end_mib'] - fake['fake_hosts_mib']:.0f}",
                str(r["threads"]),
            ]
        )
    print_table(
        f"daemon collect job over test:/// hosts, {args.cycles} cycles after the first, "
        f"daemon clock +{args.interval:g} s per cycle (s per cycle; RSS MiB at start, after "
        "cycle 1 and after the last; fake hosts: the test driver's in-process hosts alone; "
        "OS threads at the end)",
        [
            "hosts x guests",
            "up, guests",
            "first s",
            "median s",
            "p95 s",
            "RSS start",
            "RSS 1st",
            "RSS end",
            "fake hosts",
            "RSS end - fake",
            "threads",
        ],
        rows,
    )
    if args.failing:
        r = child(["status", "--hosts", str(args.failing)])
        row = (
            [f"error: {r['error']}", "", "", ""]
            if "error" in r
            else [
                f"{r['down']}/{r['hosts']}",
                str(r["exit"]),
                f"{r['wall_s']:.1f}",
                f"{r['peak_mib']:.0f}",
            ]
        )
        print_table(
            "balancerd status --json, every host refusing (qemu+tcp://127.0.x.y:1/system)",
            ["down/hosts", "exit", "wall s", "peak RSS MiB"],
            [row],
        )


if __name__ == "__main__":
    main()
