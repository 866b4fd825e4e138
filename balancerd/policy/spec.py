"""The policy document described once: keys, kinds, ranges, units and help text.

``DOCUMENT`` is the one description of a policy file. Validation walks it
(``policy/load.py``), ``schema.json`` is generated from it (``policy/schema.py``), and the
defaults come from the dataclasses in ``policy/model.py``. Rules that span several fields
are in ``policy/rules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from balancerd.policy.model import (
    Budget,
    Constraints,
    DemandForecast,
    HostRule,
    Hysteresis,
    Limits,
    Migration,
    MigrationCompression,
    MigrationTls,
    Mode,
    Objective,
    OnStall,
    Policy,
    Power,
    PowerModel,
    Resources,
    Solver,
    SolverBackend,
)
from balancerd.selectors import Over, Selected, Selector, host_labels, split_written
from balancerd.units import GIB, MIB
from balancerd.validate import (
    DAY_S,
    FRACTION,
    HOUR_S,
    INVALID,
    NAME,
    NAMES,
    YEAR_S,
    Choice,
    Field,
    Flag,
    Kind,
    ListOf,
    MapOf,
    Number,
    Obj,
    Problems,
    Text,
    amount,
    count,
    fld,
    obj,
    seconds,
)
from balancerd.yamlpos import FieldPath

API_VERSION = "balancerd/v1"
KIND = "Policy"

# Upper bounds: every value the loader accepts must run (solver coefficients stay sane,
# byte counts fit in 63 bits, durations fit a timedelta, libvirt and QEMU accept the rest).
MAX_WEIGHT = 1000.0  # resource and host-rule weights (relative to each other)
MAX_PARALLEL_CONNECTIONS = 255  # QEMU's multifd-channels limit
MAX_OBJECTIVE = 1e6  # min_improvement, migration_cost: objective units
MAX_WATTS = 1e6
MAX_HOSTS = 10_000
MAX_MIB = 2**32  # 4 PiB (as bytes: 2**52)
MAX_GIB = 2**32  # 4 EiB (as bytes: 2**62)
MAX_OVERCOMMIT = 1000.0
MAX_MOVES = 100_000
MAX_CONCURRENT = 1000
# libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX: INT64_MAX bytes/s in MiB/s.
MAX_BANDWIDTH_MIB_S = (2**63 - 1) // 2**20
# QEMU refuses a downtime limit above 2000 s (MAX_MIGRATE_DOWNTIME_SECONDS).
MAX_DOWNTIME_MS = 2_000_000
MAX_STALL_SAMPLES = 3600
MAX_SOLVER_TIME_S = HOUR_S


def _power_model() -> Obj:
    return obj(
        {
            "idle_watts": fld(amount(MAX_WATTS), "power drawn by a powered-on host with no load"),
            "max_watts": fld(amount(MAX_WATTS), "power drawn at full CPU load"),
        },
        cls=PowerModel,
    )


def _weight(attr: str, what: str) -> Field:
    return fld(
        obj(
            {"weight": fld(amount(MAX_WEIGHT), f"weight of {what} in the objective", attr)},
            defaults=Resources,
        ),
        f"{what} settings",
        inline=True,
    )


# A name or a selector in a list of hosts or VMs (balancerd/selectors.py).
PATTERN = Text(
    pattern=r"[A-Za-z0-9_.:*?\[\]!-]+",
    pattern_doc="a name or fnmatch pattern (letters, digits, _.:- and * ? [ ] !)",
    max_len=253,
)


@dataclass(frozen=True)
class Target(Kind):
    """A host or VM name, or a selector ``{hosts: {...}}`` / ``{vms: {...}}``."""

    over: Over

    def _inner(self) -> Obj:
        fields = {"names": fld(ListOf(PATTERN, min_items=1, unique=True), "fnmatch patterns")}
        if self.over is Over.HOSTS:
            fields["labels"] = fld(
                MapOf(NAME, key_doc="label", key=NAME), "host labels that must all match"
            )
        else:
            fields["tags"] = fld(
                ListOf(NAME, min_items=1, unique=True), "guest tags that must all be present"
            )
        return obj(fields)

    def expect(self) -> str:
        what = "host" if self.over is Over.HOSTS else "VM"
        return f"a {what} name or a selector {{{self.over}: {{...}}}}"

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, dict):  # a name (a number or boolean is reported as one)
            return NAME.check(value, path, out)
        if list(value) != [self.over.value]:
            other = "vms" if self.over is Over.HOSTS else "hosts"
            why = f" ({other} selectors do not fit in this list)" if other in value else ""
            return self.fail(value, path, out, f", keys {', '.join(map(str, value))}{why}")
        inner_path = (*path, self.over.value)
        attrs = self._inner().check(value[self.over.value], inner_path, out)
        if attrs is INVALID:
            return INVALID
        if not attrs:
            out.add(inner_path, f"an empty selector: give {', '.join(self._inner().fields)}")
            return INVALID
        return Selector(
            over=self.over,
            names=attrs.get("names", ()),
            labels=host_labels(attrs.get("labels", {})),
            tags=attrs.get("tags", ()),
            path=path,
        )

    def schema(self) -> dict[str, Any]:
        selector = {
            "type": "object",
            "properties": {self.over.value: self._inner().schema()},
            "required": [self.over.value],
            "additionalProperties": False,
        }
        return {"oneOf": [NAME.schema(), selector]}


@dataclass(frozen=True)
class Group(ListOf):
    """A group of VMs (affinity): at least two names, or any number with a selector."""

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        built = super().check(value, path, out)
        selector = built is not INVALID and any(isinstance(i, Selector) for i in built)
        if built is not INVALID and len(built) < 2 and not selector:
            out.add(path, f"must have at least 2 item(s), got {len(built)}")
        return built

    def schema(self) -> dict[str, Any]:
        s = super().schema()
        s["anyOf"] = [{"minItems": 2}, {"contains": {"type": "object"}}]
        return s


HOST_TARGET = Target(Over.HOSTS)
VM_TARGET = Target(Over.VMS)
HOST_TARGETS = ListOf(HOST_TARGET, unique=True)
VM_TARGETS = ListOf(VM_TARGET, unique=True)


def _constraints(**attrs: Any) -> Constraints:
    """Constraints from the validated lists: names stay in their fields, selectors go to
    ``selectors`` with the list they were written in (``resolve_policy`` joins them)."""
    found: list[Selected] = []
    out: dict[str, Any] = {}
    for key in ("exclude_vms", "exclude_hosts", "maintenance"):
        if key in attrs:
            out[key] = split_written(attrs[key], (key,), found)
    if "pin" in attrs:
        out["pin"] = {vm: split_written(h, ("pin", vm), found) for vm, h in attrs["pin"].items()}
    for key in ("affinity", "anti_affinity"):
        if key in attrs:
            out[key] = tuple(split_written(g, (key, i), found) for i, g in enumerate(attrs[key]))
    if "host_rules" in attrs:
        out["host_rules"] = tuple(
            HostRule(
                **{
                    **rule,
                    "vms": split_written(rule["vms"], ("host_rules", i, "vms"), found),
                    "hosts": split_written(rule["hosts"], ("host_rules", i, "hosts"), found),
                }
            )
            for i, rule in enumerate(attrs["host_rules"])
        )
    return Constraints(**out, selectors=tuple(found))


SPEC = obj(
    {
        "objective": fld(
            Choice(Objective),
            "balance: even out host utilization; power-save: pack guests on few hosts "
            "and power off the empty ones",
            required=True,
        ),
        "mode": fld(
            Choice(Mode),
            "automatic: migrate; recommend: only compute and report the plan",
        ),
        "resources": fld(
            obj(
                {
                    "cpu": _weight("cpu_weight", "CPU"),
                    "memory": _weight("memory_weight", "memory"),
                },
                cls=Resources,
            ),
            "how much each resource counts when balancing",
        ),
        "limits": fld(
            obj(
                {
                    "max_cpu_util": fld(FRACTION, "a host's CPU demand / capacity stays <= this"),
                    "max_mem_util": fld(FRACTION, "a host's guest memory / memory stays <= this"),
                    "mem_headroom_mib": fld(
                        amount(MAX_MIB),
                        "MiB kept free on each host for the host itself",
                        "mem_headroom_bytes",
                        scale=MIB,
                        as_int=True,
                    ),
                    "cpu_overcommit": fld(
                        amount(MAX_OVERCOMMIT, positive=True), "allowed guest vCPUs per host CPU"
                    ),
                },
                cls=Limits,
            ),
            "capacity limits no placement may break",
        ),
        "hysteresis": fld(
            obj(
                {
                    "min_improvement": fld(
                        amount(MAX_OBJECTIVE),
                        "act only if the objective improves by at least this",
                    ),
                    "cooldown_s": fld(
                        seconds(YEAR_S, zero=True), "seconds a moved guest is left alone"
                    ),
                },
                cls=Hysteresis,
            ),
            "against moving guests back and forth",
        ),
        "forecast": fld(
            obj(
                {
                    "quantile": fld(
                        FRACTION, "plan each guest's CPU at this quantile of its readings"
                    ),
                    "window_s": fld(
                        seconds(DAY_S), "seconds of readings the quantile looks back on"
                    ),
                },
                cls=DemandForecast,
            ),
            "planning demand from each guest's recent CPU readings",
        ),
        "budget": fld(
            obj(
                {
                    "max_moves": fld(count(MAX_MOVES), "migrations per cycle at most"),
                    "max_gib": fld(
                        amount(MAX_GIB),
                        "GiB of guest memory moved per cycle at most",
                        "max_bytes",
                        scale=GIB,
                        as_int=True,
                    ),
                },
                cls=Budget,
            ),
            "how much one cycle may move",
        ),
        "constraints": fld(
            obj(
                {
                    "pin": fld(
                        MapOf(
                            ListOf(HOST_TARGET, min_items=1, unique=True),
                            key_doc="VM name",
                            key=NAME,
                        ),
                        "VM -> the only hosts it may run on (names or host selectors)",
                    ),
                    "exclude_vms": fld(VM_TARGETS, "VMs never moved (still counted on their host)"),
                    "exclude_hosts": fld(HOST_TARGETS, "hosts neither source nor target of moves"),
                    "affinity": fld(
                        ListOf(Group(VM_TARGET, min_items=1, unique=True)),
                        "groups of VMs that must share one host (at least two names, or selectors)",
                    ),
                    "anti_affinity": fld(
                        ListOf(Group(VM_TARGET, min_items=1, unique=True)),
                        "groups of VMs that must run on distinct hosts (at least two names, "
                        "or selectors)",
                    ),
                    "host_rules": fld(
                        ListOf(
                            obj(
                                {
                                    "vms": fld(
                                        ListOf(VM_TARGET, min_items=1, unique=True),
                                        "VMs the rule applies to (names or VM selectors)",
                                        required=True,
                                    ),
                                    "hosts": fld(
                                        ListOf(HOST_TARGET, min_items=1, unique=True),
                                        "hosts the rule names (names or host selectors)",
                                        required=True,
                                    ),
                                    "kind": fld(
                                        Text(enum=("must", "must_not", "should", "should_not")),
                                        "must / must_not are hard; should / should_not cost "
                                        "weight per guest that breaks them",
                                        required=True,
                                    ),
                                    "weight": fld(
                                        amount(MAX_WEIGHT),
                                        "cost per guest breaking a should / should_not rule",
                                    ),
                                },
                                defaults=HostRule,  # built by _constraints (selectors apart)
                            )
                        ),
                        "VMs that must / should (not) run on some hosts",
                    ),
                    "maintenance": fld(HOST_TARGETS, "hosts to drain completely"),
                },
                cls=_constraints,
                defaults=Constraints,
            ),
            "placement rules; every list of VMs or hosts also takes selectors: "
            "{hosts: {names: [PATTERN...], labels: {KEY: VALUE}}} or "
            "{vms: {names: [PATTERN...], tags: [TAG...]}}",
        ),
        "power": fld(
            obj(
                {
                    "min_active_hosts": fld(
                        count(MAX_HOSTS), "never power off below this many hosts"
                    ),
                    "reserve_hosts": fld(
                        count(MAX_HOSTS), "hosts kept on and empty beyond what is needed"
                    ),
                    "grace_period_s": fld(
                        seconds(YEAR_S, zero=True), "seconds empty before power-off"
                    ),
                    "min_off_s": fld(
                        seconds(YEAR_S, zero=True), "seconds a host stays off at least"
                    ),
                    "allow_off_with_stopped_guests": fld(
                        Flag(),
                        "power off a host that holds defined-but-stopped guests (default "
                        "false: it stays on so they can be started)",
                    ),
                    "default_model": fld(_power_model(), "watts of hosts not in host_models"),
                    "host_models": fld(
                        MapOf(_power_model(), key_doc="host name", key=NAME), "host -> its watts"
                    ),
                },
                cls=Power,
            ),
            "host power management (objective power-save)",
        ),
        "migration": fld(
            obj(
                {
                    "bandwidth_mib_s": fld(
                        amount(MAX_BANDWIDTH_MIB_S, positive=True, doc="libvirt's maximum"),
                        "migration bandwidth cap, MiB/s",
                    ),
                    "max_downtime_ms": fld(
                        count(MAX_DOWNTIME_MS, low=1, doc="QEMU's maximum"),
                        "allowed guest pause at switch-over, ms",
                    ),
                    "max_concurrent": fld(
                        count(MAX_CONCURRENT, low=1), "migrations at once, cluster-wide"
                    ),
                    "max_concurrent_per_host": fld(
                        count(MAX_CONCURRENT, low=1), "migrations at once into or out of one host"
                    ),
                    "on_stall": fld(
                        Choice(OnStall),
                        "last step when a migration stops converging: pause the guest to "
                        "finish, abort and leave it where it was, or postcopy (run it on the "
                        "destination at once and pull the rest; where both hosts support it, "
                        "else pause; a failure mid post-copy needs recovery)",
                    ),
                    "downtime_steps_ms": fld(
                        ListOf(count(MAX_DOWNTIME_MS, low=1, doc="QEMU's maximum"), unique=True),
                        "downtimes allowed in turn while a migration stalls, ms, increasing",
                    ),
                    "auto_converge": fld(Flag(), "throttle the guest's CPUs when stalling"),
                    "stall_samples": fld(
                        count(MAX_STALL_SAMPLES, low=2),
                        "1 s samples without progress that make a stall",
                    ),
                    "max_time_s": fld(seconds(DAY_S), "hard cap on one migration, seconds"),
                    "allow_cold": fld(Flag(), "cold-migrate when a live migration fails"),
                    "allow_backward": fld(
                        Flag(), "allow destinations with older libvirt/QEMU than the source"
                    ),
                    "copy_storage_vms": fld(NAMES, "VMs whose disks may be copied"),
                    "unsafe_cache_vms": fld(NAMES, "VMs accepting disks with cache != none"),
                    "no_pause_vms": fld(NAMES, "VMs never paused: a stall aborts them"),
                    "tls": fld(
                        Choice(MigrationTls),
                        "encrypt migration streams: auto (when both hosts have QEMU's TLS "
                        "certificates), required (preflight skips a move when they lack "
                        "them), disabled",
                    ),
                    "parallel_connections": fld(
                        count(MAX_PARALLEL_CONNECTIONS),
                        "migration streams per move (VIR_MIGRATE_PARALLEL); 0 or 1: one",
                    ),
                    "compression": fld(
                        Choice(MigrationCompression),
                        "compress the migration stream: none, zstd or zlib (need "
                        "parallel_connections >= 2 and libvirt >= 9.4), or mt (QEMU's "
                        "multi-threaded compression, older libvirt)",
                    ),
                },
                cls=Migration,
            ),
            "how moves are performed",
        ),
        "solver": fld(
            obj(
                {
                    "backend": fld(Choice(SolverBackend), "MILP solver"),
                    "time_limit_s": fld(
                        seconds(MAX_SOLVER_TIME_S),
                        "seconds the solver may run (below the daemon's stall_timeout_s)",
                    ),
                    "gap": fld(Number(ge=0, lt=1), "relative gap at which the solver may stop"),
                    "migration_cost": fld(amount(MAX_OBJECTIVE), "objective units per GiB moved"),
                },
                cls=Solver,
            ),
            "the placement optimizer",
        ),
    },
    defaults=Policy,
)

DOCUMENT = obj(
    {
        "apiVersion": fld(Text(const=API_VERSION), "document format version", required=True),
        "kind": fld(Text(const=KIND), "document kind", required=True),
        "metadata": fld(
            obj(
                {
                    "name": fld(NAME, "policy name (shown in logs and metrics)", required=True),
                    "description": fld(Text(multiline=True), "free text for operators"),
                }
            ),
            "policy identity",
            required=True,
        ),
        "spec": fld(SPEC, "the policy", required=True),
    }
)
