"""Trace-driven evaluation: THR-MMT-0.8 fidelity against CloudSim 3.0.3, our power-save
policy against LR-MMT-1.2's published results, and the Bitbrains CPU + memory runs.

Writes the raw results to ``benchmarks/results/simulate.json`` and regenerates
``docs/benchmarks.md`` with PNG plots under ``docs/img/`` (``--from-json`` redraws the
document from saved results without simulating again).

    .venv/bin/python benchmarks/bench_simulate.py                 # everything (~30 min)
    .venv/bin/python benchmarks/bench_simulate.py --days 20110303 --intervals 48   # quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balancerd.policy.load import load_policy  # noqa: E402
from balancerd.simulate.cloudsim import ThrMmt  # noqa: E402
from balancerd.simulate.engine import Controller, Result, Simulation  # noqa: E402
from balancerd.simulate.ours import PolicyController  # noqa: E402
from balancerd.simulate.scenario import (  # noqa: E402
    CLOUDSIM_PLANETLAB,
    bitbrains_cluster,
    build_cluster,
)
from balancerd.simulate.traces import read_bitbrains, read_planetlab  # noqa: E402

TRACES = ROOT.parent / "shared" / "traces"
DAYS = ("20110303", "20110306", "20110309", "20110322", "20110325")
POWER_SAVE = ROOT / "benchmarks" / "policies" / "sim-power-save.yaml"
SHIPPED_POWER_SAVE = ROOT / "policies" / "power-save.yaml"  # as shipped, untuned
BALANCE = ROOT / "benchmarks" / "policies" / "sim-balance.yaml"
BB_POWER_SAVE = ROOT / "benchmarks" / "policies" / "sim-power-save-memory.yaml"

DEADLINE_S = 20.0  # a decide() call past this is a failed cycle (counted in the tables)
GREEDY = {"use_ilp": False}  # decide()'s greedy stages: the ILP on 800 hosts is ~4x slower

# CloudSim 3.0.3 on these days (issue 6): THR-MMT-0.8 kWh, migrations; LR-MMT-1.2 kWh,
# SLATAH %, PDM %, migrations.
PUBLISHED = {
    "20110303": (192.62, 26711, 163.48, 5.86, 0.079, 27859),
    "20110306": (144.74, 20908, 123.28, 5.88, 0.079, 20878),
    "20110309": (165.27, 23475, 142.09, 6.55, 0.092, 24959),
    "20110322": (201.70, 28902, 177.48, 6.13, 0.076, 32038),
    "20110325": (175.24, 24883, 152.58, 6.06, 0.078, 26513),
}


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def cli(*args: str) -> str:
    return "balancerd simulate " + " ".join(shlex.quote(a) for a in args)


def planetlab_cli(*controller: str) -> str:
    """The command for one PlanetLab day (20110303 shown) with ``controller`` arguments."""
    trace = "../shared/traces/planetlab/20110303"
    return cli("--trace", trace, "--scenario", "cloudsim-planetlab", *controller, "--json")


def run_one(kind: str, trace: Path, controller: Controller, intervals: int) -> dict[str, Any]:
    if kind == "bitbrains":
        w = read_bitbrains(trace, max_samples=(intervals + 1) if intervals else 289)
        spec = bitbrains_cluster(w)
    else:
        w = read_planetlab(trace)
        spec = CLOUDSIM_PLANETLAB
    sim = Simulation(build_cluster(spec, w), w, intervals=intervals)
    t0 = time.perf_counter()
    r: Result = sim.run(controller)
    out = r.as_json()
    out["energy_kwh_per_interval"] = r.energy_kwh_per_interval
    out["interval_times_s"] = r.interval_times_s
    out["migrations_per_interval"] = r.migrations_per_interval
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"  {out['policy']:<28} {out['energy_kwh']:8.2f} kWh  SLATAH {out['slatah_pct']:5.2f} %"
        f"  PDM {out['pdm_pct']:.4f} %  migrations {out['migrations']:6d}  "
        f"overcommit {out['mem_overcommit_events']}  {out['wall_s']:.0f} s",
        flush=True,
    )
    return out


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {
        "planetlab": {},
        "bitbrains": {},
        "intervals": args.intervals,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for day in args.days:
        trace = TRACES / "planetlab" / day
        print(f"planetlab {day}", flush=True)
        res["planetlab"][day] = {
            "thr": run_one("planetlab", trace, ThrMmt(0.8), args.intervals),
            "ours": run_one(
                "planetlab",
                trace,
                PolicyController(
                    load_policy(POWER_SAVE), decide_kwargs=GREEDY, decide_timeout_s=DEADLINE_S
                ),
                args.intervals,
            ),
            "ours_shipped": run_one(
                "planetlab",
                trace,
                PolicyController(
                    load_policy(SHIPPED_POWER_SAVE),
                    decide_kwargs=GREEDY,
                    decide_timeout_s=DEADLINE_S,
                ),
                args.intervals,
            ),
        }
    if args.bitbrains:
        trace = TRACES / "bitbrains"
        print("bitbrains", flush=True)
        res["bitbrains"] = {
            "thr": run_one("bitbrains", trace, ThrMmt(0.8), args.intervals),
            "power-save": run_one(
                "bitbrains",
                trace,
                PolicyController(
                    load_policy(BB_POWER_SAVE), decide_kwargs=GREEDY, decide_timeout_s=DEADLINE_S
                ),
                args.intervals,
            ),
            "balance": run_one(
                "bitbrains",
                trace,
                PolicyController(
                    load_policy(BALANCE), decide_kwargs=GREEDY, decide_timeout_s=DEADLINE_S
                ),
                args.intervals,
            ),
        }
    return res


# --- the document ----------------------------------------------------------------------


def pct(a: float, b: float) -> str:
    return f"{(a - b) / b * 100:+.1f} %"


def plots(res: dict[str, Any], img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img.mkdir(parents=True, exist_ok=True)
    made = []
    days = list(res["planetlab"])
    if days:
        x = np.arange(len(days))
        series = [
            ("energy_kwh", "energy (kWh)", 2),
            ("slatah_pct", "SLATAH (%)", 3),
            ("migrations", "migrations", 5),
        ]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, (key, label, pub_i) in zip(axes, series, strict=True):
            thr = [res["planetlab"][d]["thr"][key] for d in days]
            ours = [res["planetlab"][d]["ours"][key] for d in days]
            lr = [PUBLISHED[d][pub_i] for d in days]
            ax.bar(x - 0.27, thr, 0.27, label="THR-MMT-0.8 (this simulator)")
            ax.bar(x, lr, 0.27, label="LR-MMT-1.2 (CloudSim, published)")
            ax.bar(x + 0.27, ours, 0.27, label="balancerd power-save")
            ax.set_xticks(x, [d[4:] for d in days])
            ax.set_title(label)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / "planetlab-per-day.png", dpi=100)
        plt.close(fig)
        made.append("planetlab-per-day.png")

        d0 = days[0]
        fig, ax = plt.subplots(figsize=(9, 3.5))
        for key, label in (("thr", "THR-MMT-0.8"), ("ours", "balancerd power-save")):
            r = res["planetlab"][d0][key]
            hours = [t / 3600 for t in r["interval_times_s"]]
            ax.plot(hours, r["active_hosts"], label=label)
        ax.set_xlabel("hour")
        ax.set_ylabel("active hosts")
        ax.set_ylim(0, 200)
        ax.set_title(
            f"active hosts over {d0} (800 hosts; the first hour starts from "
            "CloudSim's spread-out creation placement)",
            fontsize=9,
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / "planetlab-active-hosts.png", dpi=100)
        plt.close(fig)
        made.append("planetlab-active-hosts.png")
    if res.get("bitbrains"):
        fig, ax = plt.subplots(figsize=(9, 3.5))
        for key in res["bitbrains"]:
            r = res["bitbrains"][key]
            ax.plot([t / 3600 for t in r["interval_times_s"]], r["active_hosts"], label=r["policy"])
        ax.set_xlabel("hour")
        ax.set_ylabel("active hosts")
        ax.set_title("Bitbrains: active hosts over the first day", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / "bitbrains-active-hosts.png", dpi=100)
        plt.close(fig)
        made.append("bitbrains-active-hosts.png")
    return made


def document(res: dict[str, Any], out: Path, img: Path, command: str) -> None:
    made = plots(res, img)
    imgrel = Path("img")
    pl = res["planetlab"]
    lines = [
        "# Benchmarks: trace-driven simulation",
        "",
        "Generated by `benchmarks/bench_simulate.py` (do not edit by hand). Regenerate with:",
        "",
        f"    {command}",
        "",
        f"Run started {res['started']}"
        + (f", first {res['intervals']} intervals only." if res["intervals"] else "."),
        "Each row below can be reproduced alone with the `balancerd simulate` line under it.",
        "",
        "The simulator (`balancerd/simulate/`) accounts energy and SLA exactly as CloudSim",
        "3.0.3's `PowerDatacenter` / `Helper.java` (see the module docstrings for every rule,",
        "quirks included). Traces: `../shared/traces` (README there).",
        "",
    ]
    if pl:
        lines += [
            "## Fidelity: THR-MMT-0.8 against CloudSim 3.0.3",
            "",
            "| day | CloudSim kWh | simulated kWh | Δ | CloudSim migrations | simulated | Δ |",
            "|---|---|---|---|---|---|---|",
        ]
        for d, r in pl.items():
            pub = PUBLISHED[d]
            t = r["thr"]
            lines.append(
                f"| {d} | {pub[0]:.2f} | {t['energy_kwh']:.2f} | {pct(t['energy_kwh'], pub[0])} "
                f"| {pub[1]:,} | {t['migrations']:,} | {pct(t['migrations'], pub[1])} |"
            )
        lines += [
            "",
            "Command per row (day = 20110303 shown):",
            "",
            "    " + planetlab_cli("--baseline", "thr-mmt-0.8"),
            "",
        ]
        lines += [
            "## balancerd power-save against LR-MMT-1.2 (CloudSim, published)",
            "",
            "Targets per day: energy ≤ LR-MMT-1.2 + 5 %, SLATAH ≤ 2 %, migrations ≤ 20 % of",
            "LR-MMT-1.2's. Memory: as in CloudSim's PlanetLab runs (guests request no RAM after",
            "creation, so no policy there is held to host memory; our planner is told the same);",
            "the overcommit column counts host-intervals where a decision moved guests onto a",
            "host whose guests' provisioned RAM then exceeded its 4 GiB (THR-MMT: 7-11 k).",
            "",
            "| day | energy kWh (target) | SLATAH % | PDM % | SLAV | ESV | migrations (target) "
            "| THR-MMT-0.8 kWh / SLATAH % / migr. | overcommit | met |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d, r in pl.items():
            pub = PUBLISHED[d]
            o = r["ours"]
            t = r["thr"]
            e_max = pub[2] * 1.05
            m_max = pub[5] * 0.2
            ok = o["energy_kwh"] <= e_max and o["slatah_pct"] <= 2.0 and o["migrations"] <= m_max
            lines.append(
                f"| {d} | {o['energy_kwh']:.2f} (≤ {e_max:.2f}) | {o['slatah_pct']:.2f} "
                f"| {o['pdm_pct']:.4f} | {o['slav']:.2e} | {o['esv']:.2e} "
                f"| {o['migrations']:,} (≤ {m_max:,.0f}) "
                f"| {t['energy_kwh']:.1f} / {t['slatah_pct']:.2f} / {t['migrations']:,} "
                f"| {o['mem_overcommit_events']} | {'yes' if ok else 'NO'} |"
            )
        lines += [
            "",
            "Command per row:",
            "",
            "    " + planetlab_cli("--policy", rel(POWER_SAVE)),
            "",
        ]
        lines += [
            "### The shipped `policies/power-save.yaml`, unchanged",
            "",
            "The example policy an operator starts from (CPU 0.85 of each guest's forecast,",
            "memory 0.85, 30 min cooldown per moved guest, 100 moves per 5-min cycle), side by",
            "side with THR-MMT-0.8 in the same run. Its power section (reserve host, grace",
            "period, minimum off time) is not simulated: as in CloudSim, a host that holds no",
            "guest draws nothing.",
            "",
            "| day | energy kWh | THR-MMT-0.8 kWh | SLATAH % | migrations "
            "| at most THR-MMT's energy |",
            "|---|---|---|---|---|---|",
        ]
        for d, r in pl.items():
            if "ours_shipped" not in r:
                continue
            o = r["ours_shipped"]
            t = r["thr"]
            ok = o["energy_kwh"] <= t["energy_kwh"]
            lines.append(
                f"| {d} | {o['energy_kwh']:.2f} | {t['energy_kwh']:.2f} | {o['slatah_pct']:.2f} "
                f"| {o['migrations']:,} | {'yes' if ok else 'NO'} |"
            )
        lines += [
            "",
            "    " + planetlab_cli("--policy", rel(SHIPPED_POWER_SAVE)),
            "",
        ]
        lines += [
            "### Run time of one simulated day (800 hosts, 288 intervals)",
            "",
            "| day | THR-MMT-0.8 wall s | power-save wall s | decision s mean / p95 / max "
            "| decide() timeouts |",
            "|---|---|---|---|---|",
        ]
        for d, r in pl.items():
            o = r["ours"]
            lines.append(
                f"| {d} | {r['thr']['wall_s']} | {o['wall_s']} | {o['decision_s_mean']:.2f} / "
                f"{o['decision_s_p95']:.2f} / {o['decision_s_max']:.2f} "
                f"| {o.get('decide_timeouts', 0)} |"
            )
        lines += [
            "",
            "Decision time = snapshot from the simulated hypervisor's counters "
            "(`collect.build_snapshot`) + forecast + `decide()`; measured on the shared "
            "2-core machine while other jobs ran. `balancerd simulate` runs decide()'s greedy "
            "stages unless given `--ilp` (the ILP stage, up to the policy's time limit per "
            "interval, made a day take ~4-5 min here instead of ~30 s).",
            "",
        ]
    for name in made:
        if name.startswith("planetlab"):
            lines += [f"![{name}]({imgrel / name})", ""]
    if pl:
        lines += [
            "Plots: `"
            + " ".join(["python", "benchmarks/bench_simulate.py", "--from-json"])
            + "` redraws them from `benchmarks/results/simulate.json`.",
            "",
        ]
    bb = res.get("bitbrains") or {}
    if bb:
        any_r = next(iter(bb.values()))
        lines += [
            "## Bitbrains (CPU + memory)",
            "",
            f"{any_r['vms']} VMs of GWA-T-12 Rnd, first {len(any_r['active_hosts'])} intervals; "
            f"{any_r['hosts']} IBM x3550 M3 hosts (12 x 3067 MHz, 32 GiB, CloudSim's X5675 "
            "SPECpower table), as many as twice the peak memory in use needs: memory binds. "
            "A guest's memory is its memory in use per sample. Overcommit events = hosts "
            "(per interval) that a decision left holding more guest memory than the host has "
            "(guests counted where their migrations take them, at the usage the decision saw): "
            "must be 0. Growth events = hosts found over their memory at the start of an "
            "interval because guests grew since the last decision (the workload, not a decision; "
            "the next decision must fix them); unrelieved = hosts still over after a decision "
            "that moved nothing onto them (it could not, or did not, relieve them).",
            "",
            "| policy | energy kWh | SLATAH % | PDM % | migrations | mean active hosts | "
            "memory overcommit events | growth / unrelieved | decide() timeouts |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in bb.values():
            lines.append(
                f"| {r['policy']} | {r['energy_kwh']:.2f} | {r['slatah_pct']:.2f} | "
                f"{r['pdm_pct']:.4f} | {r['migrations']} | {r['active_hosts_mean']} | "
                f"{r['mem_overcommit_events']} | {r.get('mem_growth_events', '')} / "
                f"{r.get('mem_unrelieved_events', '')} | {r.get('decide_timeouts', 0)} |"
            )
        lines += [
            "",
            "Commands:",
            "",
            "    " + cli("--trace", "../shared/traces/bitbrains", "--baseline", "thr-mmt-0.8"),
            "    " + cli("--trace", "../shared/traces/bitbrains", "--policy", rel(BB_POWER_SAVE)),
            "    " + cli("--trace", "../shared/traces/bitbrains", "--policy", rel(BALANCE)),
            "",
            "THR-MMT ignores memory after creation (as CloudSim does), hence its overcommit.",
            "",
        ]
        for name in made:
            if name.startswith("bitbrains"):
                lines += [f"![{name}]({imgrel / name})", ""]
    out.write_text("\n".join(lines) + _kept_tail(out))


KEEP_MARKER = "<!-- sections below are written by other benchmarks; bench_simulate keeps them -->"


def _kept_tail(out: Path) -> str:
    """What follows KEEP_MARKER in the current document (e.g. bench_balance's section)."""
    if not out.exists():
        return ""
    text = out.read_text()
    at = text.find(KEEP_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", nargs="*", default=list(DAYS))
    ap.add_argument("--intervals", type=int, default=0, help="first N intervals only")
    ap.add_argument("--no-bitbrains", dest="bitbrains", action="store_false")
    ap.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "simulate.json"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--from-json", action="store_true", help="only redraw the document")
    args = ap.parse_args()
    command = ".venv/bin/python benchmarks/bench_simulate.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a != "--from-json"
    )
    if args.from_json:
        res = json.loads(args.results.read_text())
        command = res.get("command", command)
    else:
        missing = [d for d in args.days if not (TRACES / "planetlab" / d).is_dir()]
        if missing or (args.bitbrains and not (TRACES / "bitbrains").is_dir()):
            print(f"traces absent under {TRACES}: {missing or 'bitbrains'}", file=sys.stderr)
            return 2
        res = simulate(args)
        res["command"] = command
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(res))
    document(res, args.out, args.out.parent / "img", command.strip())
    print(f"wrote {rel(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
