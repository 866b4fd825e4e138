"""``balancerd status``: hosts, guests and utilization now; the daemon's state if it runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from balancerd.config import load_config
from balancerd.daemon_state import read_daemon_status
from balancerd.model import Snapshot, Vm, blockers_text
from balancerd.units import GIB, MIB
from balancerd.wiring import add_snapshot_arguments, cluster_snapshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_snapshot_arguments(parser)


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    hosts = []
    usage = snapshot.host_usage()
    for h in snapshot.hosts:
        vms = snapshot.vms_on(h.name)
        hosts.append(
            {
                "name": h.name,
                "uri": h.uri,
                "up": h.up,
                "error": h.error or None,
                "cpus": h.cpus,
                "cpu_mhz": h.cpu_mhz,
                "mem_bytes": h.mem_bytes,
                "mem_free_bytes": h.mem_free_bytes,
                "cpu_util": round(h.cpu_util, 4),
                "mem_util": round(h.mem_util, 4),
                # Guest demand in host terms: what the solver balances.
                "guest_cpu_util": round(usage.get(h.name, (0.0, 0.0))[0], 4),
                "hostname": h.hostname,
                "host_uuid": h.host_uuid,
                "vms": [
                    {
                        "name": v.name,
                        "uuid": v.uuid,
                        "state": v.state,
                        "vcpus": v.vcpus,
                        "mem_bytes": v.mem_bytes,
                        "cpu_util": round(v.cpu_util, 4),
                        "cpu_cores": round(v.cpu_cores, 4),
                        "blockers": _blockers_json(v),
                    }
                    for v in vms
                ],
                # defined but not running: no load now; moved cold when the host drains
                "stopped_vms": [
                    {
                        "name": v.name,
                        "uuid": v.uuid,
                        "state": v.state,
                        "vcpus": v.vcpus,
                        "mem_bytes": v.mem_bytes,
                        "blockers": _blockers_json(v),
                    }
                    for v in snapshot.stopped_on(h.name)
                ],
            }
        )
    return {"hosts": hosts}


def _blockers_json(v: Vm) -> list[dict[str, str]]:
    return [{"kind": str(b.kind), "detail": b.detail} for b in v.blockers]


def _guest_line(v: Vm, cpu: str) -> str:
    line = f"  - {v.name:<20} {v.state:<8} {v.vcpus} vCPU {v.mem_bytes / MIB:>7.0f} MiB {cpu}"
    if v.blockers:
        line += f"  unmovable ({blockers_text(v.blockers)})"
    return line


def render_table(snapshot: Snapshot) -> str:
    lines = [
        f"{'HOST':<12} {'UP':<4} {'CPUS':>4} {'CPU%':>6} {'GUEST%':>7} {'MEM GiB':>8} {'MEM%':>6}"
        f"  GUESTS"
    ]
    usage = snapshot.host_usage()
    for h in snapshot.hosts:
        vms = snapshot.vms_on(h.name)
        if not h.up:
            lines.append(f"{h.name:<12} {'no':<4}  ({h.error})")
            continue
        guest_pct = 100 * usage[h.name][0]
        stopped = snapshot.stopped_on(h.name)
        lines.append(
            f"{h.name:<12} {'yes':<4} {h.cpus:>4} {100 * h.cpu_util:>5.1f}% {guest_pct:>6.1f}% "
            f"{h.mem_bytes / GIB:>8.1f} {100 * h.mem_util:>5.1f}%  {len(vms)}"
            + (f" (+{len(stopped)} stopped)" if stopped else "")
        )
        for v in vms:
            lines.append(_guest_line(v, f"cpu {100 * v.cpu_util:5.1f}%"))
        for v in stopped:
            lines.append(_guest_line(v, "stopped"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    snapshot, source = cluster_snapshot(config, args.samples, args.interval)
    daemon = read_daemon_status(config.state_dir)
    if args.json:
        out = snapshot_json(snapshot)
        out["daemon"] = daemon
        out["snapshot"] = source.to_json()
        print(json.dumps(out, indent=2))
    else:
        print(f"snapshot: {source.detail}")
        print(render_table(snapshot))
        if daemon:
            print()
            print(f"daemon: pid {daemon.get('pid')} {daemon.get('state', '')}")
            print(
                f"  policy: {daemon.get('policy')} ({daemon.get('objective')}, "
                f"{daemon.get('mode')})"
            )
            print(f"  last cycle: {daemon.get('last_cycle')}")
            for m in daemon.get("in_flight", []):
                print(
                    f"  migrating: {m.get('vm')} {m.get('src')}->{m.get('dst')} "
                    f"(id {m.get('migration_id')})"
                )
            for b in daemon.get("backing_off", []):
                to = f" -> {b['to']}" if b.get("to") else ""
                print(f"  held back: {b['vm']}{to} for {b['for_s']} s: {b['reason']}")
        else:
            print("\ndaemon: not running (no live status in the state directory)")
    return 0 if any(h.up for h in snapshot.hosts) else 1
