"""Power manager (pure, table-driven) and the drivers (real processes and sockets)."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerd.config import HostConfig, PowerDriverConfig
from balancerd.errors import ConfigError
from balancerd.model import Host, Placement, Plan, Snapshot, SolverReport, Vm
from balancerd.policy.model import Power
from balancerd.power import (
    CommandDriver,
    HostPower,
    IpmiDriver,
    LabDriver,
    PowerDecision,
    PowerError,
    PowerTracker,
    WolDriver,
    apply_power,
    decide_power,
    drivers_for,
    make_driver,
)
from balancerd.power.command import expand
from balancerd.power.manager import OFF_SETTLE_S
from balancerd.power.wol import magic_packet, parse_mac

GIB = 1024**3
NOW = 10_000.0


# --- the pure decision ------------------------------------------------------------------


def cluster(
    guests: dict[str, str],
    hosts: tuple[str, ...] = ("h1", "h2", "h3", "h4"),
    down: tuple[str, ...] = (),
    off: tuple[str, ...] = (),
) -> Snapshot:
    hs = tuple(
        Host(h, f"qemu+tcp://{h}/system", up=h not in down and h not in off, cpus=8,
             mem_bytes=32 * GIB, mem_free_bytes=16 * GIB, powered_off=h in off)
        for h in hosts
    )  # fmt: skip
    vms = tuple(Vm(v, f"u-{v}", h, "running", 2, 2 * GIB, 0.2) for v, h in guests.items())
    return Snapshot(NOW, hs, vms)


def plan(
    snap: Snapshot,
    power_off: tuple[str, ...] = (),
    power_on: tuple[str, ...] = (),
    target: dict[str, str] | None = None,
) -> Plan:
    cur = snap.placement()
    return Plan(
        policy="night",
        objective="power-save",
        moves=(),
        current=cur,
        target=Placement(target if target is not None else dict(cur.host_of)),
        solver=SolverReport("cbc", "optimal", 0.1, 1.0, 1.0, 0.0),
        power_off=power_off,
        power_on=power_on,
    )


def empty_for(s: float) -> HostPower:
    return HostPower(on=True, empty_since_s=NOW - s)


def off_for(s: float) -> HostPower:
    return HostPower(on=False, off_since_s=NOW - s)


POWER = Power(min_active_hosts=1, reserve_hosts=0, grace_period_s=300, min_off_s=900)


@dataclass
class Case:
    name: str
    guests: dict[str, str]
    history: dict[str, HostPower]
    power_off: tuple[str, ...] = ()
    power_on: tuple[str, ...] = ()
    power: Power = POWER
    off: tuple[str, ...] = ()
    down: tuple[str, ...] = ()
    target: dict[str, str] | None = None
    busy: tuple[str, ...] = ()
    switchable: tuple[str, ...] | None = None
    want_off: tuple[str, ...] = ()
    want_on: tuple[str, ...] = ()
    held: dict[str, str] = field(default_factory=dict)  # host -> words in the reason


BUSY = {"a": "h1", "b": "h2"}
CASES = [
    Case("empty past grace goes off", BUSY, {"h3": empty_for(400), "h4": empty_for(10)},
         power_off=("h3", "h4"), want_off=("h3",), held={"h4": "grace period"}),
    Case("never empty: no history", BUSY, {}, power_off=("h3",), held={"h3": "grace period"}),
    Case("a host with guests is never powered off", BUSY, {"h1": empty_for(10_000)},
         power_off=("h1",), held={"h1": "has guests"}),
    Case("a host the target fills stays on", BUSY, {"h3": empty_for(400)}, power_off=("h3",),
         target={"a": "h3", "b": "h2"}, held={"h3": "has guests"}),
    Case("a host in a migration stays on", BUSY, {"h3": empty_for(400)}, power_off=("h3",),
         busy=("h3",), held={"h3": "has guests"}),
    Case("a host that does not answer stays", BUSY, {"h3": empty_for(400)}, power_off=("h3",),
         down=("h3",), held={"h3": "not answering"}),
    Case("no driver, no switch", BUSY, {"h3": empty_for(400)}, power_off=("h3",),
         switchable=("h1", "h2"), held={"h3": "no power driver"}),
    Case("reserve keeps one empty host on (the newest empty)", BUSY,
         {"h3": empty_for(400), "h4": empty_for(1000)}, power_off=("h3", "h4"),
         power=Power(reserve_hosts=1, grace_period_s=300), want_off=("h4",),
         held={"h3": "reserve"}),
    Case("min active hosts", {"a": "h1"},
         {"h2": empty_for(500), "h3": empty_for(700), "h4": empty_for(600)},
         power_off=("h2", "h3", "h4"), power=Power(min_active_hosts=3, grace_period_s=300),
         want_off=("h3",), held={"h4": "active", "h2": "active"}),
    Case("never the last host, even with min_active_hosts 0", {},
         {h: empty_for(999) for h in ("h1", "h2")}, power_off=("h1", "h2"),
         power=Power(min_active_hosts=0, grace_period_s=300), off=("h3", "h4"),
         want_off=("h1",), held={"h2": "active"}),
    Case("already off is left alone", BUSY, {"h3": off_for(10)}, power_off=("h3",), off=("h3",),
         held={"h3": "already off"}),
    Case("needed by the plan: on at once despite min off time", BUSY,
         {"h3": off_for(10), "h4": empty_for(10)}, power_on=("h3",), off=("h3",),
         want_on=("h3",)),
    Case("reserve restored with a host off long enough", BUSY,
         {"h3": off_for(10), "h4": off_for(2000)}, off=("h3", "h4"),
         power=Power(reserve_hosts=1, min_off_s=900), want_on=("h4",)),
    Case("reserve not restored with a host off too briefly", {"a": "h1", "b": "h2",
         "c": "h4"}, {"h3": off_for(10)}, off=("h3",),
         power=Power(reserve_hosts=1, min_off_s=900), held={"h3": "min off time"}),
    Case("floor restored at once", {"a": "h1"},
         {"h2": off_for(10), "h3": off_for(20), "h4": off_for(30)}, off=("h2", "h3", "h4"),
         power=Power(min_active_hosts=2, min_off_s=900), want_on=("h4",)),
    Case("plan need counts toward the floor", {"a": "h1"},
         {"h2": off_for(10), "h3": off_for(20), "h4": off_for(30)}, off=("h2", "h3", "h4"),
         power_on=("h2",), power=Power(min_active_hosts=2, min_off_s=900), want_on=("h2",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide_power(case: Case) -> None:
    snap = cluster(case.guests, down=case.down, off=case.off)
    decision = decide_power(
        plan(snap, case.power_off, case.power_on, case.target),
        snap,
        case.power,
        case.history,
        NOW,
        switchable=case.switchable,
        busy=case.busy,
    )
    assert decision.power_off == case.want_off
    assert decision.power_on == case.want_on
    for host, words in case.held.items():
        assert words in decision.held.get(host, ""), (host, decision.held)


@settings(max_examples=200, deadline=None)
@given(
    placement=st.dictionaries(
        st.sampled_from([f"vm{i}" for i in range(6)]), st.sampled_from(["h1", "h2", "h3", "h4"])
    ),
    empty_s=st.lists(st.floats(0, 2000), min_size=4, max_size=4),
    listed=st.sets(st.sampled_from(["h1", "h2", "h3", "h4"])),
    min_active=st.integers(0, 4),
    reserve=st.integers(0, 3),
)
def test_no_guest_host_is_ever_powered_off_and_floor_holds(
    placement: dict[str, str],
    empty_s: list[float],
    listed: set[str],
    min_active: int,
    reserve: int,
) -> None:
    snap = cluster(placement)
    history = {h: empty_for(s) for h, s in zip(("h1", "h2", "h3", "h4"), empty_s, strict=True)}
    power = Power(min_active_hosts=min_active, reserve_hosts=reserve, grace_period_s=300)
    d = decide_power(plan(snap, tuple(sorted(listed))), snap, power, history, NOW)
    with_guests = set(placement.values())
    assert not with_guests & set(d.power_off)
    assert len(snap.hosts) - len(d.power_off) >= max(1, min_active) or not d.power_off
    empty_left = {h.name for h in snap.hosts} - with_guests - set(d.power_off)
    assert len(empty_left) >= reserve or not d.power_off


# --- the tracker --------------------------------------------------------------------------


def test_tracker_remembers_when_a_host_became_empty() -> None:
    t = PowerTracker()
    t.observe(cluster({"a": "h1", "b": "h2"}), 100.0)
    assert t.hosts["h2"].empty_since_s is None
    assert t.hosts["h3"].empty_since_s == 100.0
    t.observe(cluster({"a": "h1"}), 200.0)  # b left h2
    t.observe(cluster({"a": "h1"}), 300.0)
    assert t.hosts["h2"].empty_since_s == 200.0  # kept, not refreshed
    assert t.hosts["h3"].empty_since_s == 100.0
    t.observe(cluster({"a": "h1", "c": "h3"}), 400.0)
    assert t.hosts["h3"].empty_since_s is None


def test_tracker_switches_and_round_trip() -> None:
    t = PowerTracker()
    t.observe(cluster({"a": "h1"}), 100.0)
    t.mark_off("h3", 500.0)
    t.observe(cluster({"a": "h1"}, off=("h3",)), 600.0)
    assert t.hosts["h3"] == HostPower(on=False, off_since_s=500.0)
    assert t.powered_off() == ("h3",)
    again = PowerTracker.from_json(t.to_json("boot-1"), "boot-1", 9999.0)
    assert again.hosts == t.hosts
    # Written during another boot, the (monotonic) times mean nothing: they restart now,
    # so no grace period or minimum off time is cut short.
    rebooted = PowerTracker.from_json(t.to_json("boot-1"), "boot-2", 42.0)
    assert rebooted.hosts["h3"] == HostPower(on=False, off_since_s=42.0)
    assert rebooted.hosts["h1"].empty_since_s is None
    t.mark_on("h3", 700.0)
    t.observe(cluster({"a": "h1"}), 710.0)
    assert t.hosts["h3"] == HostPower(on=True, empty_since_s=710.0)  # a full grace again


def test_tracker_sees_a_host_switched_on_behind_its_back() -> None:
    t = PowerTracker({"h3": HostPower(on=False, off_since_s=1.0)})
    t.observe(cluster({"a": "h1"}), 1.0 + OFF_SETTLE_S + 50.0)  # h3 answers again
    assert t.hosts["h3"].on


def test_tracker_keeps_a_host_it_just_switched_off_that_still_answers() -> None:
    """A host shutting down still answers a sample or two: it stays known as off."""
    t = PowerTracker()
    t.mark_off("h3", 100.0)
    t.observe(cluster({"a": "h1"}), 110.0)  # h3 still up in this sample
    assert not t.hosts["h3"].on
    assert t.powered_off() == ("h3",)


def test_power_off_looks_again_right_before_acting() -> None:
    """A guest that arrived since the plan's snapshot cancels the power-off."""
    calls: list[str] = []

    class Driver:
        def power_on(self, host: str) -> None:
            calls.append(f"on {host}")

        def power_off(self, host: str) -> None:
            calls.append(f"off {host}")

    t = PowerTracker()
    decision = PowerDecision(power_off=("h2", "h3"), power_on=(), held={})
    busy = {"h2": "it holds late-vm (running)"}
    results = apply_power(
        decision, {"h2": Driver(), "h3": Driver()}, t, 5.0, still_empty=lambda h: busy.get(h, "")
    )
    assert calls == ["off h3"]
    assert [(r.host, r.ok) for r in results] == [("h2", False), ("h3", True)]
    assert "late-vm" in results[0].error
    assert t.powered_off() == ("h3",)


# --- apply_power ------------------------------------------------------------------------


class RecordingDriver:
    """A fake power driver: records calls, fails on the hosts it is told to."""

    def __init__(self, calls: list[str], fail: tuple[str, ...] = ()) -> None:
        self.calls = calls
        self.fail = fail

    def power_on(self, host: str) -> None:
        self._do("on", host)

    def power_off(self, host: str) -> None:
        self._do("off", host)

    def is_on(self, host: str) -> bool | None:
        return None

    def _do(self, action: str, host: str) -> None:
        self.calls.append(f"{action} {host}")
        if host in self.fail:
            raise PowerError(f"{host}: power {action}: BMC unreachable")


def test_apply_power_switches_on_first_and_tracks_only_successes() -> None:
    calls: list[str] = []
    drv = RecordingDriver(calls, fail=("h4",))
    tracker = PowerTracker({"h2": HostPower(on=False, off_since_s=1.0)})
    decision = PowerDecision(power_off=("h3", "h4"), power_on=("h2",), held={})
    results = apply_power(decision, {"h2": drv, "h3": drv, "h4": drv}, tracker, 1000.0)
    assert calls == ["on h2", "off h3", "off h4"]
    assert [(r.host, r.action, r.ok) for r in results] == [
        ("h2", "on", True),
        ("h3", "off", True),
        ("h4", "off", False),
    ]
    assert "BMC unreachable" in results[2].error
    assert tracker.hosts["h2"].on and not tracker.hosts["h3"].on
    assert "h4" not in tracker.hosts


# --- drivers: Wake-on-LAN -------------------------------------------------------------


def test_wol_sends_a_magic_packet() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(10)
        port = rx.getsockname()[1]
        WolDriver("52:54:00:AB:cd:01", broadcast="127.0.0.1", port=port).power_on("h1")
        data, _ = rx.recvfrom(1024)
    assert len(data) == 102
    assert data[:6] == b"\xff" * 6
    mac = bytes.fromhex("525400abcd01")
    assert all(data[6 + 6 * i : 12 + 6 * i] == mac for i in range(16))


@pytest.mark.parametrize("mac", ["52:54:00:ab:cd:01", "52-54-00-AB-CD-01", "5254.00ab.cd01"])
def test_mac_formats(mac: str) -> None:
    assert parse_mac(mac) == bytes.fromhex("525400abcd01")
    assert magic_packet(mac)[6:12] == bytes.fromhex("525400abcd01")


@pytest.mark.parametrize("mac", ["", "52:54:00:ab:cd", "zz:54:00:ab:cd:01", "52:54:00:ab:cd:01:02"])
def test_bad_macs(mac: str) -> None:
    with pytest.raises(PowerError):
        parse_mac(mac)


def test_wol_cannot_power_off_without_a_command() -> None:
    with pytest.raises(PowerError, match="cannot power off"):
        WolDriver("52:54:00:ab:cd:01").power_off("h1")
    assert WolDriver("52:54:00:ab:cd:01").is_on("h1") is None


# --- drivers: commands and ipmitool (real processes) --------------------------------------


def recorder(tmp_path: Path, name: str, stdout: str = "", exit_code: int = 0) -> Path:
    """An executable that appends its argv (JSON) to NAME.log and prints ``stdout``."""
    log = tmp_path / f"{name}.log"
    script = tmp_path / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"print({stdout!r})\n"
        f"sys.stderr.write('boom\\n' if {exit_code} else '')\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def calls(tmp_path: Path, name: str) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / f"{name}.log").read_text().splitlines()]


def test_command_driver_substitutes_host_without_a_shell(tmp_path: Path) -> None:
    tool = recorder(tmp_path, "power")
    canary = tmp_path / "canary"
    host = f"h1; touch {canary}"
    drv = CommandDriver([str(tool), "--on", "{host}"], [str(tool), "--off", "node={host}"])
    drv.power_on(host)
    drv.power_off("h2")
    assert calls(tmp_path, "power") == [["--on", host], ["--off", "node=h2"]]
    assert not canary.exists()
    assert drv.is_on("h1") is None


def test_command_driver_reports_failures(tmp_path: Path) -> None:
    tool = recorder(tmp_path, "power", exit_code=3)
    drv = CommandDriver([str(tool), "{host}"], [str(tool), "{host}"], status_command=[str(tool)])
    with pytest.raises(PowerError, match=r"h1: power on: .*exited 3: boom"):
        drv.power_on("h1")
    assert drv.is_on("h1") is False  # non-zero status command: off
    with pytest.raises(PowerError, match="not found"):
        CommandDriver([str(tmp_path / "missing")], []).power_on("h1")
    with pytest.raises(PowerError, match="bad command template"):
        CommandDriver(["x", "{hostname}"], []).power_on("h1")


def test_command_driver_times_out(tmp_path: Path) -> None:
    drv = CommandDriver([sys.executable, "-c", "import time; time.sleep(30)"], [], timeout_s=0.5)
    with pytest.raises(PowerError, match="timed out"):
        drv.power_on("h1")


@pytest.mark.parametrize(("output", "expected"), [("Chassis Power is on", True),
                                                  ("Chassis Power is off", False)])  # fmt: skip
def test_ipmi_argument_list_and_status(tmp_path: Path, output: str, expected: bool) -> None:
    tool = recorder(tmp_path, "ipmitool", stdout=output)
    drv = IpmiDriver(
        "10.0.0.101",
        "admin",
        "/etc/balancerd/ipmi-h1.pass",
        ipmitool=str(tool),
        soft_off_timeout_s=0.2,
        poll_s=0.05,
    )
    drv.power_on("h1")
    drv.power_off("h1")
    assert drv.is_on("h1") is expected
    base = ["-I", "lanplus", "-H", "10.0.0.101", "-U", "admin", "-f"]
    base += ["/etc/balancerd/ipmi-h1.pass", "chassis", "power"]
    actions = [c[-1] for c in calls(tmp_path, "ipmitool")]
    assert calls(tmp_path, "ipmitool")[0] == [*base, "on"]
    # Soft (ACPI) first; a host that reports off is left at that; one that stays on gets
    # a hard power-off once the soft timeout has passed.
    assert actions[1:3] == ["soft", "status"]
    if expected:
        assert actions[-2:] == ["off", "status"] and actions.count("status") >= 2
    else:
        assert actions == ["on", "soft", "status", "status"]


def test_ipmi_odd_status_is_an_error(tmp_path: Path) -> None:
    tool = recorder(tmp_path, "ipmitool", stdout="Error: Unable to establish IPMI v2 session")
    with pytest.raises(PowerError, match="unexpected ipmitool output"):
        IpmiDriver("a", "u", "/etc/balancerd/ipmi.pass", ipmitool=str(tool)).is_on("h1")


def test_lab_driver_names_the_lab_in_errors(tmp_path: Path) -> None:
    """Without a lab in lab_dir the driver fails with a PowerError, not a traceback."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    with pytest.raises(PowerError, match=str(tmp_path)):
        LabDriver(str(tmp_path)).power_off("host9")


# --- the factory --------------------------------------------------------------------------


def test_make_driver_builds_each_kind() -> None:
    assert make_driver(PowerDriverConfig()) is None
    ipmi = make_driver(
        PowerDriverConfig("ipmi", ipmi_address="bmc1", ipmi_user="u", ipmi_password_file="/p")
    )
    assert isinstance(ipmi, IpmiDriver) and ipmi.argv("status")[4] == "bmc1"
    assert isinstance(make_driver(PowerDriverConfig("wol", mac="52:54:00:ab:cd:01")), WolDriver)
    cmd = make_driver(PowerDriverConfig("command", on_command=("a",), off_command=("b",)))
    assert isinstance(cmd, CommandDriver)
    assert isinstance(make_driver(PowerDriverConfig("lab", lab_dir="/run/lab")), LabDriver)


def test_drivers_for_reports_every_problem_at_once() -> None:
    hosts = (
        HostConfig("h1", "qemu+tcp://h1/system", power=PowerDriverConfig("ipmi", ipmi_user="u")),
        HostConfig("h2", "qemu+tcp://h2/system", power=PowerDriverConfig("wol", mac="nope")),
        HostConfig("h3", "qemu+tcp://h3/system", power=PowerDriverConfig("magic")),
        HostConfig("h4", "qemu+tcp://h4/system"),
    )
    with pytest.raises(ConfigError) as err:
        drivers_for(hosts)
    assert err.value.problems == [
        "hosts[0].power.address: required by driver ipmi",
        "hosts[0].power.password_file: required by driver ipmi",
        "hosts[1].power.mac: bad MAC address 'nope'",
        "hosts[2].power.driver: unknown driver 'magic' (one of none, ipmi, wol, command, lab)",
    ]
    good = drivers_for(
        (*hosts[3:], HostConfig("h5", "u", power=PowerDriverConfig("lab", lab_dir="/x")))
    )
    assert list(good) == ["h5"]


# --- secrets and templates ---------------------------------------------------------------


def test_a_password_file_open_to_others_is_refused_at_build_and_use(tmp_path: Path) -> None:
    """The driver refuses a group/world-readable password file; chmod'ed after the
    driver was built, ipmitool is not run with it."""
    tool = recorder(tmp_path, "ipmitool", stdout="Chassis Power is on")
    secret = tmp_path / "bmc.pw"
    secret.write_text("S3cret\n")
    secret.chmod(0o644)
    cfg = PowerDriverConfig(
        "ipmi", ipmi_address="bmc", ipmi_user="u", ipmi_password_file=str(secret)
    )
    with pytest.raises(ConfigError) as err:
        make_driver(cfg, "hosts[0].power")
    assert err.value.problems == [
        f"hosts[0].power.password_file: {secret} is open to group or others (mode 0644): a "
        f"password file must be readable by its owner only (chmod 600 {secret})"
    ]
    secret.chmod(0o600)
    drv = make_driver(cfg)
    assert isinstance(drv, IpmiDriver)
    drv.ipmitool = str(tool)
    assert drv.is_on("h1") is True
    secret.chmod(0o604)
    with pytest.raises(PowerError, match=r"h1: power soft: password_file .* \(mode 0604\)"):
        drv.power_off("h1")
    assert [c[-1] for c in calls(tmp_path, "ipmitool")] == ["status"]  # off never ran


@pytest.mark.parametrize(
    "template", ["{host.__class__.__mro__}", "{host:>999999999}", "{host!r}", "{0}", "{", "}"]
)
def test_command_templates_substitute_only_the_host(template: str) -> None:
    """Was: str.format ran any field: attributes of the host string, or a format spec
    that builds a gigabyte."""
    with pytest.raises(PowerError, match="bad command template"):
        expand(["x", template], "h1")
    assert expand(["x{{literal}}", "--node={host}"], "h1") == ["x{literal}", "--node=h1"]
