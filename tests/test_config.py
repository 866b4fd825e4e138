"""Daemon config loading: round trip, every problem with file:line, cron weekdays."""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from balancerd.config import (
    START_TIMEOUT_S,
    Config,
    HostConfig,
    PowerDriverConfig,
    ScheduleEntry,
    cron_trigger,
    cross_check_policies,
    load_config,
    load_config_text,
    uri_problem,
)
from balancerd.daemon.reload import load_all
from balancerd.errors import ConfigError
from balancerd.power import drivers_for

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
    # --- every value accepted must run
    (
        "never_ready_in_time",
        _edit("collect_interval_s: 10", "collect_interval_s: 100"),
        "collect_interval_s",
        "collect_interval_s",
        "100 s: READY needs 2 samples (200 s), longer than the start timeout "
        "TimeoutStartSec=180 s of balancerd.service",
    ),
    (
        "cycle_of_30000_years",
        _edit("cycle_interval_s: 120", "cycle_interval_s: 1.0e+12"),
        "cycle_interval_s",
        "cycle_interval_s",
        "must be a number in (0, 31536000] (at most 1 year), got 1000000000000.0",
    ),
    (
        "host_timeout_forever",
        _edit("host_timeout_s: 2.5", "host_timeout_s: 1.0e+12"),
        "host_timeout_s",
        "host_timeout_s",
        "must be a number in (0, 3600] (at most 1 hour)",
    ),
    (
        "stall_timeout_forever",
        GOOD + "stall_timeout_s: 1.0e+12\n",
        "stall_timeout_s",
        "stall_timeout_s",
        "must be a number in (0, 86400] (at most 1 day)",
    ),
    (
        "window_overflows_timedelta",
        _edit("duration_h: 11", "duration_h: 1.0e+12"),
        "duration_h",
        "schedule[0].duration_h",
        "must be a number in (0, 8760] (1 year), got 1000000000000.0",
    ),
    (
        "window_seconds_overflow",
        _edit("duration_s: 3600", "duration_s: 1.0e+300"),
        "duration_s",
        "schedule[1].duration_s",
        "(at most 1 year)",
    ),
    (
        "cron_never_fires",
        _edit('cron: "0 2 * * 0"', 'cron: "0 2 30 2 *"'),
        "30 2",
        "schedule[1].cron",
        "'0 2 30 2 *' never fires (no such date)",
    ),
    (
        "ipmi_without_user",
        _edit("user: admin, ", ""),
        "driver: ipmi",
        "hosts[2].power.user",
        "required by driver ipmi",
    ),
    (
        "ipmi_without_password_file",
        _edit(", password_file: /etc/bmc.pw", ""),
        "driver: ipmi",
        "hosts[2].power.password_file",
        "required by driver ipmi",
    ),
    (
        "relative_password_file",
        _edit("password_file: /etc/bmc.pw", "password_file: bmc.pw"),
        "bmc.pw",
        "hosts[2].power.password_file",
        "must be an absolute path, got 'bmc.pw'",
    ),
    (
        "template_reads_attributes",
        _edit('power-on, "{host}"', 'power-on, "{host.__class__}"'),
        "power-on",
        "hosts[1].power.on_command[1]",
        "bad command template '{host.__class__}': only {host} may be substituted",
    ),
    (
        "template_builds_a_gigabyte",
        _edit('power-off, "{host}"', 'power-off, "{host:>999999999}"'),
        "power-off",
        "hosts[1].power.off_command[1]",
        "bad command template '{host:>999999999}'",
    ),
    (
        "template_unbalanced",
        _edit('power-off, "{host}"', 'power-off, "{host"'),
        "power-off",
        "hosts[1].power.off_command[1]",
        "bad command template '{host'",
    ),
    (
        "wol_bad_broadcast",
        _edit('mac: "52:54:00:12:34:56"}', 'mac: "52:54:00:12:34:56", broadcast: 10.0.0.256}'),
        "broadcast",
        "hosts[3].power.broadcast",
        "must be an IPv4 address, got '10.0.0.256'",
    ),
    (
        "uri_ext_runs_a_program",
        _edit("qemu+tls://host4/system", "qemu+ext:///system?command=/bin/sh"),
        "qemu+ext",
        "hosts[3].uri",
        "transport 'qemu+ext' is not allowed (known: qemu, qemu+tcp, qemu+tls, qemu+ssh, "
        "qemu+unix, test); list it in allow_uri_transports to use it",
    ),
    (
        "uri_unknown_driver",
        _edit("qemu+tls://host4/system", "xen+ssh://host4/system"),
        "xen+ssh",
        "hosts[3].uri",
        "transport 'xen+ssh' is not allowed",
    ),
    (
        "uri_ssh_netcat",
        _edit("qemu+tls://host4/system", "qemu+ssh://host4/system?netcat=/tmp/evil"),
        "netcat",
        "hosts[3].uri",
        "query parameter netcat= makes libvirt run a program: refused",
    ),
    (
        "uri_escaped_parameter",
        _edit("qemu+tls://host4/system", "qemu+ssh://host4/system?keyfile=k&%6EetCat=x"),
        "keyfile",
        "hosts[3].uri",
        "query parameter netcat= makes libvirt run a program",
    ),
    (
        "uri_semicolon_parameter",
        _edit("qemu+tls://host4/system", "qemu+tcp://host4/system?a=b;command=x"),
        "command",
        "hosts[3].uri",
        "query parameter command= makes libvirt run a program",
    ),
    (
        "uri_without_transport",
        _edit("qemu+tls://host4/system", "host4/system"),
        "host4/system",
        "hosts[3].uri",
        "not a libvirt URI: 'host4/system' has no transport",
    ),
    (
        "allowed_transport_spelled_badly",
        GOOD + 'allow_uri_transports: ["qemu ext"]\n',
        "allow_uri_transports",
        "allow_uri_transports[0]",
        "must be a libvirt URI scheme like qemu+libssh2, got 'qemu ext'",
    ),
    (
        "listen_port_in_other_digits",
        _edit('listen: "127.0.0.1:9177"', 'listen: "127.0.0.1:\u00b2"'),
        "listen",
        "metrics.listen",
        "port must be 1..65535, got '\u00b2'",
    ),
    (
        "listen_bad_host",
        _edit('listen: "127.0.0.1:9177"', 'listen: "local host:9177"'),
        "listen",
        "metrics.listen",
        "not an IP address or host name: 'local host'",
    ),
    (
        "nul_in_a_path",
        _edit("state_dir: /var/lib/test", 'state_dir: "/var/lib/\\0test"'),
        "state_dir",
        "state_dir",
        "must be a non-empty string, got '/var/lib/\\x00test' (control character #x00 not allowed)",
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


# ------------------------------------------------------------- runnable, and secrets kept


REPO = Path(__file__).resolve().parent.parent


def test_start_timeout_is_the_units() -> None:
    """The READY rule uses the unit's TimeoutStartSec: the two must not drift apart."""
    unit = (REPO / "systemd" / "balancerd.service").read_text()
    (value,) = re.findall(r"^TimeoutStartSec=(\d+)$", unit, re.M)
    assert float(value) == START_TIMEOUT_S


def test_ready_just_in_time_is_accepted(folder: Path) -> None:
    text = _edit("collect_interval_s: 10", "collect_interval_s: 90")
    assert load_config(write(folder, text)).collect_interval_s == 90.0


def test_allowed_transport_may_run_its_program(folder: Path) -> None:
    """The operator's explicit choice: the transport and its program parameters."""
    uri = "qemu+ext:///system?command=/usr/local/bin/connect"
    text = _edit("qemu+tls://host4/system", uri)
    assert any("qemu+ext" in p for p in config_problems(folder, text))
    config = load_config(write(folder, text + "allow_uri_transports: [qemu+ext]\n"))
    assert config.hosts[3].uri == uri
    assert config.allow_uri_transports == ("qemu+ext",)


@pytest.mark.parametrize(
    "uri",
    ["qemu:///system", "QEMU+TCP://h/system", "qemu+unix:///system?socket=/s", "test:///default"],
)
def test_known_transports_are_accepted(uri: str) -> None:
    assert uri_problem(uri) == ""


def test_a_password_file_open_to_others_is_refused(folder: Path) -> None:
    secret = folder / "bmc.pw"
    secret.write_text("S3cret\n")
    text = _edit("password_file: /etc/bmc.pw", f"password_file: {secret}")
    secret.chmod(0o640)
    found = config_problems(folder, text)
    src = folder / "balancerd.yaml"
    assert found == [
        f"{src}:{line_of(text, 'bmc.pw')}: hosts[2].power.password_file: {secret} is open to "
        f"group or others (mode 0640): a password file must be readable by its owner only "
        f"(chmod 600 {secret})"
    ]
    secret.chmod(0o600)
    assert load_config(write(folder, text)).hosts[2].power.ipmi_password_file == str(secret)
    secret.unlink()  # not there (yet): checked again when the driver is built and used
    load_config(write(folder, text))


PASSWORD = "S3cret-Hunter2"


@pytest.mark.parametrize(
    "content",
    [
        PASSWORD,
        f"{PASSWORD}\n",
        f"{PASSWORD}: x",
        f"*{PASSWORD}",
        f"!{PASSWORD}",
        f"&{PASSWORD} x",
        f"'{PASSWORD}",
        f"[{PASSWORD}",
        f"{PASSWORD}\x01",
        f"- {PASSWORD}",
        "123456789",
    ],
    ids=lambda c: repr(c.replace(PASSWORD, "P"))[1:-1],
)
def test_a_password_file_read_by_mistake_is_not_printed(folder: Path, content: str) -> None:
    """``policy:`` (or --config) naming the IPMI password file: the error says where, and
    never what the file holds."""
    secret = folder / "ipmi.pw"
    secret.write_text(content)
    secret.chmod(0o600)
    text = _edit("policy: policies/day.yaml\nschedule", f"policy: {secret}\nschedule")
    config = write(folder, text)
    with pytest.raises(ConfigError) as as_policy:
        load_all(str(config))
    with pytest.raises(ConfigError) as as_config:
        load_config(secret)
    for problem in as_policy.value.problems + as_config.value.problems:
        assert problem.startswith(f"{secret}:")
        assert PASSWORD not in problem and "123456789" not in problem, problem


POLICY_TEXT = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: p}
spec:
  objective: balance
  solver: {backend: BACKEND, time_limit_s: LIMIT}
"""


@pytest.mark.parametrize(
    ("backend", "limit", "refused"),
    [
        ("cbc", "60", "60 s is not below stall_timeout_s 60 s"),
        ("cbc", "59.5", "59.5 s (CBC runs 60 s) is not below stall_timeout_s 60 s"),
        ("highs", "59.5", ""),
        ("cbc", "59", ""),
        ("highs", "3600", "3600 s is not below stall_timeout_s 60 s"),
    ],
)
def test_a_solve_must_end_before_the_watchdog_stall(
    folder: Path, backend: str, limit: str, refused: str
) -> None:
    """A solve does not report progress: longer than stall_timeout_s, systemd restarts
    balancerd in the middle of every cycle."""
    policy = folder / "policies" / "day.yaml"
    policy.write_text(POLICY_TEXT.replace("BACKEND", backend).replace("LIMIT", limit))
    path = write(folder, GOOD + "stall_timeout_s: 60\n")
    if not refused:
        loaded = load_all(str(path))
        assert cross_check_policies(loaded.config, loaded.policies) == []
        return
    # load_all (start and every reload) runs the check and refuses the set.
    with pytest.raises(ConfigError) as err:
        load_all(str(path))
    stall_line = line_of(GOOD + "stall_timeout_s: 60", "stall_timeout_s")
    assert err.value.problems == [
        f"{policy}:6: spec.solver.time_limit_s: {refused} ({path}:{stall_line}): "
        "the systemd watchdog would restart balancerd during a solve"
    ]


POWER_SECTIONS = [
    "{driver: ipmi}",
    "{driver: ipmi, address: bmc, user: u}",
    "{driver: ipmi, address: bmc, user: u, password_file: /nonexistent/pw}",
    "{driver: ipmi, address: bmc, user: u, password_file: pw}",
    "{driver: wol}",
    "{driver: wol, mac: '52:54:00:00:00:01', off_command: [ssh, '{host}', poweroff]}",
    "{driver: wol, mac: '52:54:00:00:00:01', broadcast: nowhere}",
    "{driver: command, on_command: [x]}",
    "{driver: command, on_command: [x, '{0}'], off_command: [y]}",
    "{driver: command, on_command: ['x{{host}}'], off_command: ['y{host}']}",
    "{driver: lab}",
    "{driver: lab, lab_dir: /run/lab}",
    "{driver: none}",
    "{}",
]


@pytest.mark.parametrize("power", POWER_SECTIONS)
def test_an_accepted_power_section_builds_its_driver(folder: Path, power: str) -> None:
    """Was: ipmi without user / password_file passed the loader, then drivers_for raised
    at start (or after a reload's swap) on every restart."""
    host = f"  - {{name: h1, uri: 'qemu:///system', power: {power}}}\n"
    text = f"hosts:\n{host}policy: policies/day.yaml\n"
    try:
        config = load_config(write(folder, text))
    except ConfigError as exc:
        assert all(
            p.startswith(f"{folder / 'balancerd.yaml'}:2: hosts[0].power") for p in exc.problems
        )
        return
    drivers_for(config.hosts)  # never raises for what the loader accepted
