"""Daemon config loading: round trip, every problem with file:line, cron weekdays."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from balancerd.config import (
    Config,
    HostConfig,
    PowerDriverConfig,
    ScheduleEntry,
    cron_trigger,
    load_config,
    load_config_text,
)
from balancerd.errors import ConfigError

POLICY = "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: p}\nspec: {objective: balance}\n"

GOOD = """\
hosts:
  - name: host1
    uri: qemu+tcp://10.77.0.11/system
    migration_uri: tcp://10.77.0.11
    cpus: 4
    mem_mib: 2048
    power: {driver: lab, lab_dir: /run/lab}
  - name: host2
    uri: qemu+tcp://10.77.0.12/system
    power:
      driver: command
      on_command: [/usr/local/bin/power-on, "{host}"]
      off_command: [/usr/local/bin/power-off, "{host}"]
  - name: host3
    uri: qemu+tls://host3/system
    power: {driver: ipmi, address: 10.0.0.3, user: admin, password_file: /etc/bmc.pw}
  - name: host4
    uri: qemu+tls://host4/system
    power: {driver: wol, mac: "52:54:00:12:34:56"}
policy: policies/day.yaml
schedule:
  - {cron: "0 7 * * 1-5", duration_h: 11, policy: policies/day.yaml}
  - {cron: "0 2 * * 0", duration_s: 3600, freeze: true}
metrics: {listen: "127.0.0.1:9177"}
state_dir: /var/lib/test
collect_interval_s: 10
cycle_interval_s: 120
smoothing_window: 3
host_timeout_s: 2.5
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "day.yaml").write_text(POLICY)
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "balancerd.yaml"
    path.write_text(text)
    return path


def config_problems(folder: Path, text: str) -> list[str]:
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems
    return info.value.problems


def line_of(text: str, needle: str) -> int:
    """1-based line of the LAST line containing ``needle`` (a repeated value's second use)."""
    return [i for i, line in enumerate(text.splitlines(), 1) if needle in line][-1]


def test_good_config_round_trips(folder: Path) -> None:
    path = write(folder, GOOD)
    expected = Config(
        hosts=(
            HostConfig(
                name="host1",
                uri="qemu+tcp://10.77.0.11/system",
                migration_uri="tcp://10.77.0.11",
                power=PowerDriverConfig(driver="lab", lab_dir="/run/lab"),
                cpus=4,
                mem_bytes=2048 * 1024 * 1024,
            ),
            HostConfig(
                name="host2",
                uri="qemu+tcp://10.77.0.12/system",
                power=PowerDriverConfig(
                    driver="command",
                    on_command=("/usr/local/bin/power-on", "{host}"),
                    off_command=("/usr/local/bin/power-off", "{host}"),
                ),
            ),
            HostConfig(
                name="host3",
                uri="qemu+tls://host3/system",
                power=PowerDriverConfig(
                    driver="ipmi",
                    ipmi_address="10.0.0.3",
                    ipmi_user="admin",
                    ipmi_password_file="/etc/bmc.pw",
                ),
            ),
            HostConfig(
                name="host4",
                uri="qemu+tls://host4/system",
                power=PowerDriverConfig(driver="wol", mac="52:54:00:12:34:56"),
            ),
        ),
        policy="policies/day.yaml",
        schedule=(
            ScheduleEntry(cron="0 7 * * 1-5", duration_s=11 * 3600.0, policy="policies/day.yaml"),
            ScheduleEntry(cron="0 2 * * 0", duration_s=3600.0, freeze=True),
        ),
        metrics_listen="127.0.0.1:9177",
        state_dir="/var/lib/test",
        collect_interval_s=10.0,
        cycle_interval_s=120.0,
        smoothing_window=3,
        host_timeout_s=2.5,
        source=str(path),
    )
    got = load_config(path)
    assert got == expected
    assert got.policy_path() == folder / "policies" / "day.yaml"


def test_minimal_config_takes_defaults(folder: Path) -> None:
    text = "hosts:\n  - {name: h1, uri: 'qemu:///system'}\npolicy: policies/day.yaml\n"
    path = write(folder, text)
    assert load_config(path) == Config(
        hosts=(HostConfig(name="h1", uri="qemu:///system"),),
        policy="policies/day.yaml",
        source=str(path),
    )


def test_relative_policy_is_taken_from_the_config_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    path = write(folder, GOOD)
    assert load_config(path).policy_path() == folder / "policies" / "day.yaml"


# (name, text replacing a line of GOOD or a whole file, needle of the reported line,
#  field path, message fragment)
def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD = [
    (
        "duplicate_host_name",
        _edit("  - name: host2\n", "  - name: host1\n"),
        "  - name: host1",
        "hosts[1].name",
        "'host1' is used by hosts[0] too",
    ),
    (
        "duplicate_uri",
        _edit("qemu+tls://host4/system", "qemu+tls://host3/system"),
        "host3/system",
        "hosts[3].uri",
        "'qemu+tls://host3/system' is used by hosts[2] too",
    ),
    (
        "unknown_host_key",
        _edit("    cpus: 4\n", "    cpu: 4\n"),
        "cpu: 4",
        "hosts[0].cpu",
        "unknown key (did you mean 'cpus'?)",
    ),
    (
        "negative_mem",
        _edit("mem_mib: 2048", "mem_mib: -1"),
        "mem_mib",
        "hosts[0].mem_mib",
        "must be a number in [0, 4294967296], got -1",
    ),
    (
        "bad_driver",
        _edit("driver: lab", "driver: redfish"),
        "redfish",
        "hosts[0].power.driver",
        "must be one of ipmi | wol | command | lab | none, got 'redfish'",
    ),
    (
        "driver_needs_key",
        _edit("{driver: ipmi, address: 10.0.0.3, ", "{driver: ipmi, "),
        "driver: ipmi",
        "hosts[2].power.address",
        "required by driver ipmi",
    ),
    (
        "key_of_other_driver",
        _edit(
            "{driver: lab, lab_dir: /run/lab}",
            "{driver: lab, lab_dir: /x, mac: '52:54:00:00:00:01'}",
        ),
        "driver: lab",
        "hosts[0].power.mac",
        "not used by driver lab",
    ),
    (
        "bad_mac",
        _edit('mac: "52:54:00:12:34:56"', 'mac: "52:54:00"'),
        "52:54:00",
        "hosts[3].power.mac",
        "must be a MAC address like 52:54:00:12:34:56, got '52:54:00'",
    ),
    (
        "listen_without_port",
        _edit('listen: "127.0.0.1:9177"', 'listen: "127.0.0.1"'),
        "listen",
        "metrics.listen",
        "must be HOST:PORT",
    ),
    (
        "listen_bad_port",
        _edit('listen: "127.0.0.1:9177"', 'listen: "127.0.0.1:99999"'),
        "listen",
        "metrics.listen",
        "port must be 1..65535, got '99999'",
    ),
    (
        "listen_bare_ipv6",
        _edit('listen: "127.0.0.1:9177"', 'listen: "::1:9177"'),
        "listen",
        "metrics.listen",
        "an IPv6 address must be written [ADDR]:PORT",
    ),
    (
        "cron_too_few_fields",
        _edit('cron: "0 7 * * 1-5"', 'cron: "0 7 * *"'),
        "0 7 * *",
        "schedule[0].cron",
        "expected 5 fields",
    ),
    (
        "cron_bad_hour",
        _edit('cron: "0 2 * * 0"', 'cron: "0 25 * * 0"'),
        "0 25",
        "schedule[1].cron",
        "not a valid crontab expression '0 25 * * 0'",
    ),
    (
        "cron_bad_weekday",
        _edit('cron: "0 7 * * 1-5"', 'cron: "0 7 * * 1-8"'),
        "1-8",
        "schedule[0].cron",
        "bad day-of-week '1-8'",
    ),
    (
        "no_duration",
        _edit("duration_h: 11, ", ""),
        "0 7 * * 1-5",
        "schedule[0]",
        "missing duration_h or duration_s",
    ),
    (
        "both_durations",
        _edit("duration_h: 11, ", "duration_h: 11, duration_s: 60, "),
        "0 7 * * 1-5",
        "schedule[0].duration_s",
        "give duration_h or duration_s, not both",
    ),
    (
        "freeze_with_policy",
        _edit("freeze: true}", "freeze: true, policy: policies/day.yaml}"),
        "freeze",
        "schedule[1].policy",
        "a freeze window has no policy",
    ),
    (
        "window_without_policy",
        _edit(", policy: policies/day.yaml}", "}"),
        "0 7 * * 1-5",
        "schedule[0]",
        "missing policy (or freeze: true",
    ),
    (
        "missing_policy_file",
        _edit("policy: policies/day.yaml\nschedule", "policy: policies/night.yaml\nschedule"),
        "night.yaml",
        "policy",
        "policy file not found: ",
    ),
    (
        "missing_schedule_policy_file",
        _edit("duration_h: 11, policy: policies/day.yaml", "duration_h: 11, policy: gone.yaml"),
        "gone.yaml",
        "schedule[0].policy",
        "policy file not found: ",
    ),
    (
        "cycle_shorter_than_collect",
        _edit("cycle_interval_s: 120", "cycle_interval_s: 5"),
        "cycle_interval_s",
        "cycle_interval_s",
        "5 is shorter than collect_interval_s 10",
    ),
    (
        "zero_smoothing",
        _edit("smoothing_window: 3", "smoothing_window: 0"),
        "smoothing_window",
        "smoothing_window",
        "must be an integer in [1, 1000], got 0",
    ),
    (
        "unknown_top_level_key",
        _edit("state_dir:", "statedir:"),
        "statedir",
        "statedir",
        "unknown key (did you mean 'state_dir'?)",
    ),
    (
        "missing_hosts",
        "policy: policies/day.yaml\n",
        "policy",
        "hosts",
        "missing required key",
    ),
    (
        "no_hosts",
        "hosts: []\npolicy: policies/day.yaml\n",
        "hosts",
        "hosts",
        "must have at least 1 item(s), got 0",
    ),
    (
        "host_missing_uri",
        "hosts:\n  - name: h1\npolicy: policies/day.yaml\n",
        "name: h1",
        "hosts[0].uri",
        "missing required key",
    ),
    (
        "duplicate_key",
        GOOD + "state_dir: /again\n",
        "/again",
        "state_dir",
        "duplicate key (first written at line",
    ),
]


@pytest.mark.parametrize(
    ("text", "needle", "path", "message"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_config(folder: Path, text: str, needle: str, path: str, message: str) -> None:
    found = config_problems(folder, text)
    prefix = f"{folder / 'balancerd.yaml'}:{line_of(text, needle)}: {path}: "
    assert any(p.startswith(prefix) and message in p for p in found), (
        f"want {prefix}...{message}\ngot:\n" + "\n".join(found)
    )


def test_all_config_problems_at_once(folder: Path) -> None:
    text = textwrap.dedent(
        """\
        hosts:
          - {name: a, uri: "qemu:///a"}
          - {name: a, uri: "qemu:///b", cpus: -2}
        policy: nowhere.yaml
        metrics: {listen: nope}
        cycle_interval_s: 0
        """
    )
    found = config_problems(folder, text)
    src = folder / "balancerd.yaml"
    assert found == [
        f"{src}:3: hosts[1].cpus: must be an integer in [0, 1048576], got -2",
        f"{src}:3: hosts[1].name: 'a' is used by hosts[0] too: each host needs its own",
        f"{src}:4: policy: policy file not found: {folder / 'nowhere.yaml'}",
        f"{src}:5: metrics.listen: must be HOST:PORT (e.g. 127.0.0.1:9177), got 'nope'",
        f"{src}:6: cycle_interval_s: must be a number in (0, 31536000] (at most 1 year), got 0",
    ]


def test_yaml_syntax_error_has_file_and_line(folder: Path) -> None:
    found = config_problems(folder, "hosts:\n  - name: h1\n   uri: x\n")
    assert len(found) == 1
    assert found[0].startswith(f"{folder / 'balancerd.yaml'}:3: YAML syntax error")


def test_load_config_text_resolves_from_source(folder: Path) -> None:
    config = load_config_text(GOOD, str(folder / "any.yaml"))
    assert config.policy_path() == folder / "policies" / "day.yaml"
    with pytest.raises(ConfigError):
        load_config_text(GOOD, str(folder / "policies" / "nested" / "any.yaml"))


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"
    ]


# ------------------------------------------------------------------------------- cron

UTC = UTC
SUNDAY = datetime(2026, 11, 29, 0, 0, tzinfo=UTC)  # a Sunday


@pytest.mark.parametrize(
    ("expr", "weekdays"),
    [
        ("0 7 * * 1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
        ("0 7 * * 0", {"Sun"}),
        ("0 7 * * 7", {"Sun"}),
        ("0 7 * * 5-7", {"Fri", "Sat", "Sun"}),
        ("0 7 * * */2", {"Sun", "Tue", "Thu", "Sat"}),
        ("0 7 * * 1,3", {"Mon", "Wed"}),
        ("0 7 * * mon-fri", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
        ("0 7 * * *", {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}),
    ],
)
def test_cron_weekdays_follow_crontab(expr: str, weekdays: set[str]) -> None:
    """Cron's day-of-week numbers (0/7 = Sunday); APScheduler's from_crontab differs."""
    trigger = cron_trigger(expr, timezone=UTC)
    fired: set[str] = set()
    previous = None
    now = SUNDAY
    for _ in range(14):  # two weeks of daily firings
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None and fire.hour == 7
        fired.add(fire.strftime("%a"))
        previous, now = fire, fire + timedelta(seconds=1)
    assert fired == weekdays
