"""``balancerd simulate``: replay a workload trace on a simulated cluster.

    balancerd simulate --trace ../shared/traces/planetlab/20110303 \\
        --scenario cloudsim-planetlab --baseline thr-mmt-0.8 --json
    balancerd simulate --trace ../shared/traces/planetlab/20110303 \\
        --scenario cloudsim-planetlab --policy policies/power-save.yaml --plot day.png
    balancerd simulate --trace ../shared/traces/bitbrains --policy policies/balance.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import TextIO

from balancerd.errors import ConfigError
from balancerd.simulate.cloudsim import ThrMmt
from balancerd.simulate.engine import Controller, Result, Simulation
from balancerd.simulate.ours import Forecast, PolicyController
from balancerd.simulate.scenario import (
    BUILTIN,
    ClusterSpec,
    bitbrains_cluster,
    build_cluster,
    load_cluster_spec,
)
from balancerd.simulate.traces import Workload, is_bitbrains, read_bitbrains, read_trace

BITBRAINS_DEFAULT_SAMPLES = 289  # one day of intervals
BASELINE_RE = re.compile(r"^thr-mmt-(\d+(?:\.\d+)?)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        required=True,
        metavar="DIR",
        help="PlanetLab day directory or Bitbrains directory (*.csv.gz)",
    )
    parser.add_argument(
        "--scenario",
        default="",
        help="built-in cluster: cloudsim-planetlab (default for PlanetLab) or "
        "bitbrains (default for Bitbrains: sized so memory binds)",
    )
    parser.add_argument(
        "--cluster",
        metavar="FILE",
        default="",
        help="YAML cluster description (host types, counts, power tables); overrides --scenario",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--policy", metavar="FILE", help="policy file: the daemon's decide pipeline")
    who.add_argument(
        "--baseline",
        metavar="NAME",
        help="published heuristic: thr-mmt-<threshold>, e.g. thr-mmt-0.8",
    )
    parser.add_argument(
        "--intervals", type=int, default=0, help="simulate only the first N scheduling intervals"
    )
    parser.add_argument("--max-vms", type=int, default=0, help="Bitbrains: use the first N VMs")
    parser.add_argument(
        "--forecast-window",
        type=int,
        default=0,
        help="readings per guest the planning demand looks back on "
        "(default: the policy's spec.forecast.window_s / the trace interval)",
    )
    parser.add_argument(
        "--forecast-latest-floor",
        action="store_true",
        help="never plan a guest below its latest reading",
    )
    parser.add_argument(
        "--forecast-quantile",
        type=float,
        default=0.0,
        help="planning demand = this quantile of the window "
        "(default: the policy's spec.forecast.quantile)",
    )
    parser.add_argument(
        "--ilp",
        action="store_true",
        help="let decide() run its ILP stage too (each interval up to the policy's "
        "solver.time_limit_s; default: its greedy stages only, so a day of 800 hosts "
        "takes well under 5 minutes)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        default="",
        help="write active hosts, energy and migrations over time",
    )
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def controller_for(args: argparse.Namespace, interval_s: float) -> Controller:
    if args.baseline:
        m = BASELINE_RE.match(args.baseline)
        if not m:
            raise ConfigError(
                [
                    f"--baseline {args.baseline}: known baselines: thr-mmt-<threshold> "
                    "(e.g. thr-mmt-0.8)"
                ]
            )
        return ThrMmt(float(m.group(1)))
    from balancerd.policy.load import load_policy

    if not 0 <= args.forecast_quantile <= 1 or args.forecast_window < 0:
        raise ConfigError(["--forecast-quantile must be in (0, 1], --forecast-window >= 1"])
    policy = load_policy(args.policy)
    # The daemon's rule (spec.forecast) in trace readings, unless overridden here.
    window = args.forecast_window or max(1, round(policy.forecast.window_s / interval_s))
    return PolicyController(
        policy,
        forecast=Forecast(
            window=window,
            quantile=args.forecast_quantile or policy.forecast.quantile,
            latest_floor=args.forecast_latest_floor,
        ),
        decide_kwargs={} if args.ilp else {"use_ilp": False},
    )


def cluster_spec(args: argparse.Namespace, workload: Workload) -> ClusterSpec:
    if args.cluster:
        return load_cluster_spec(args.cluster)
    name = args.scenario or ("bitbrains" if workload.kind == "bitbrains" else "cloudsim-planetlab")
    if name == "bitbrains":
        if workload.kind != "bitbrains":
            raise ConfigError(["--scenario bitbrains needs a Bitbrains trace (*.csv.gz)"])
        return bitbrains_cluster(workload)
    if name not in BUILTIN:
        raise ConfigError(
            [f"--scenario {name}: built-in scenarios: {', '.join([*BUILTIN, 'bitbrains'])}"]
        )
    if workload.kind != "planetlab":
        raise ConfigError(
            [
                f"--scenario {name} takes a PlanetLab trace; for Bitbrains use "
                "--scenario bitbrains or --cluster FILE"
            ]
        )
    return BUILTIN[name]


class ProgressBar:
    """One line on stderr, redrawn at most every 0.2 s."""

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        filled = int(self.width * done / max(1, total))
        elapsed = now - self.t0
        eta = elapsed / done * (total - done) if done else 0.0
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{total} intervals {elapsed:5.0f}s eta {eta:4.0f}s"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def summary(r: Result) -> str:
    j = r.as_json()
    lines = [
        f"scenario {r.scenario}: {r.n_hosts} hosts, {r.n_vms} VMs, policy {r.controller}",
        f"energy        {r.energy_kwh:10.2f} kWh",
        f"SLATAH        {r.slatah * 100:10.2f} %",
        f"PDM           {r.pdm * 100:10.3f} %",
        f"SLAV          {r.slav:10.3e}",
        f"ESV           {r.esv:10.3e}",
        f"migrations    {r.migrations:10d}",
        f"active hosts  {j['active_hosts_mean']:10} mean, {max(r.active_hosts, default=0)} max",
        f"mem overcommit{r.mem_overcommit_events:10d} host-intervals",
        f"decision time {j['decision_s_mean']:10.3f} s mean, {j['decision_s_max']:.3f} s max",
        f"wall time     {r.wall_s:10.1f} s",
    ]
    return "\n".join(lines)


def plot(r: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [t / 3600 for t in r.interval_times_s]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    axes[0].plot(hours, r.active_hosts, color="tab:blue")
    axes[0].set_ylabel("active hosts")
    axes[1].plot(hours, [e * 1000 for e in r.energy_kwh_per_interval], color="tab:orange")
    axes[1].set_ylabel("energy / interval (Wh)")
    axes[2].bar(hours, r.migrations_per_interval, width=0.07, color="tab:green")
    axes[2].set_ylabel("migrations")
    axes[2].set_xlabel("hour")
    fig.suptitle(
        f"{r.scenario} — {r.controller}: {r.energy_kwh:.1f} kWh, "
        f"SLATAH {r.slatah * 100:.2f} %, {r.migrations} migrations"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    samples = args.intervals + 1 if args.intervals > 0 else 0
    if is_bitbrains(args.trace):
        # a month of 300 s samples: one day unless --intervals says otherwise
        workload = read_bitbrains(
            args.trace, max_samples=samples or BITBRAINS_DEFAULT_SAMPLES, max_vms=args.max_vms
        )
    else:
        workload = read_trace(args.trace, max_samples=samples)
    spec = cluster_spec(args, workload)
    cluster = build_cluster(spec, workload)
    controller = controller_for(args, workload.interval_s)
    sim = Simulation(cluster, workload, intervals=args.intervals)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = ProgressBar(sys.stderr, controller.name) if show else None
    result = sim.run(controller, progress=bar)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(summary(result))
    return 0
