"""Workload trace readers: PlanetLab (CoMon) and Bitbrains GWA-T-12.

Both return a ``Workload``: one row per VM, one column per sample, CPU utilization of the
VM's own capacity (0..1). Malformed input raises ``ConfigError`` whose problems each name
the file and line (``FILE:LINE: message``), all problems of a file at once.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from balancerd.errors import ConfigError
from balancerd.units import KIB

FloatArray = npt.NDArray[np.float64]

PLANETLAB_INTERVAL_S = 300.0
BITBRAINS_COLUMNS = 11
MAX_PROBLEMS = 20  # per reader call: enough to fix a file, not a wall of text


@dataclass(frozen=True)
class Workload:
    """CPU (and optionally memory) demand of every VM at every sample."""

    kind: str  # planetlab | bitbrains
    names: tuple[str, ...]
    cpu_util: FloatArray  # [vm, sample], 0..1 of the VM's own CPU capacity
    interval_s: float
    # Bitbrains only: what each VM was provisioned with, and memory in use per sample.
    vm_cores: tuple[int, ...] = ()
    vm_cpu_mhz: tuple[float, ...] = ()  # capacity of all its cores together
    vm_mem_bytes: tuple[int, ...] = ()  # provisioned
    mem_used_bytes: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def n_vms(self) -> int:
        return len(self.names)

    @property
    def n_samples(self) -> int:
        return int(self.cpu_util.shape[1]) if self.cpu_util.ndim == 2 else 0


def _problem(problems: list[str], where: str, msg: str) -> None:
    if len(problems) < MAX_PROBLEMS:
        problems.append(f"{where}: {msg}")


def read_planetlab_file(path: Path, problems: list[str]) -> list[int]:
    """One PlanetLab file: one integer CPU percentage (0..100) per line, no header."""
    values: list[int] = []
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        _problem(problems, str(path), f"cannot read: {exc.strerror or exc}")
        return values
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            if lineno == len(text.splitlines()):
                break
            _problem(problems, f"{path}:{lineno}", "empty line, expected an integer CPU %")
            continue
        try:
            value = int(line)
        except ValueError:
            _problem(problems, f"{path}:{lineno}", f"not an integer CPU %: {line[:40]!r}")
            continue
        if not 0 <= value <= 100:
            _problem(problems, f"{path}:{lineno}", f"CPU % {value} out of range 0..100")
            continue
        values.append(value)
    return values


def read_planetlab(directory: str | os.PathLike[str], *, max_samples: int = 0) -> Workload:
    """Every file of ``directory`` is one VM; VMs are ordered by sorted file name."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError([f"{root}: not a directory of PlanetLab trace files"])
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError([f"{root}: no trace files"])
    problems: list[str] = []
    rows: list[list[int]] = []
    for path in files:
        rows.append(read_planetlab_file(path, problems))
    if problems:
        raise ConfigError(problems)
    lengths = {len(r) for r in rows}
    n = min(lengths)
    if n == 0:
        empty = next(p for p, r in zip(files, rows, strict=True) if not r)
        raise ConfigError([f"{empty}:1: no samples"])
    if len(lengths) > 1:
        short = next(p for p, r in zip(files, rows, strict=True) if len(r) == n)
        long_ = max(lengths)
        raise ConfigError(
            [f"{short}:{n + 1}: file ends after {n} samples; others have up to {long_}"]
        )
    if max_samples:
        n = min(n, max_samples)
    cpu = np.array([r[:n] for r in rows], dtype=np.float64) / 100.0
    return Workload(
        kind="planetlab",
        names=tuple(p.name for p in files),
        cpu_util=cpu,
        interval_s=PLANETLAB_INTERVAL_S,
    )


@dataclass(frozen=True)
class BitbrainsVm:
    name: str
    timestamps_s: list[int]
    cores: int
    cpu_capacity_mhz: float
    cpu_usage_mhz: list[float]
    mem_capacity_kb: float
    mem_usage_kb: list[float]


def read_bitbrains_file(path: Path, problems: list[str], max_rows: int = 0) -> BitbrainsVm | None:
    """One Bitbrains VM: a header line, then ``;``+tab separated rows of 11 columns."""
    opener = gzip.open if path.name.endswith(".gz") else open
    n_before = len(problems)
    ts: list[int] = []
    cores = 0
    cap_mhz = 0.0
    mem_cap_kb = 0.0
    usage: list[float] = []
    mem: list[float] = []
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.strip()
                if lineno == 1 and line.lower().startswith("timestamp"):
                    continue
                if not line:
                    continue
                cols = [c.strip() for c in line.split(";")]
                if len(cols) != BITBRAINS_COLUMNS:
                    _problem(
                        problems,
                        f"{path}:{lineno}",
                        f"expected {BITBRAINS_COLUMNS} ';'-separated columns, got {len(cols)}",
                    )
                    continue
                try:
                    t = int(float(cols[0]))
                    c = int(float(cols[1]))
                    vals = [float(x) for x in cols[2:]]
                except ValueError:
                    _problem(problems, f"{path}:{lineno}", f"not a number in {line[:60]!r}")
                    continue
                if not all(math.isfinite(v) for v in vals) or min(vals) < 0 or c < 0:
                    _problem(problems, f"{path}:{lineno}", "negative or non-finite value")
                    continue
                # c == 0 / capacity 0: the VM was not provisioned then (uses nothing)
                if ts and t <= ts[-1]:
                    _problem(problems, f"{path}:{lineno}", f"timestamp {t} not after {ts[-1]}")
                    continue
                ts.append(t)
                cores = max(cores, c)
                cap_mhz = max(cap_mhz, vals[0])
                usage.append(vals[1])
                mem_cap_kb = max(mem_cap_kb, vals[3])
                mem.append(vals[4])
                if max_rows and len(ts) >= max_rows:
                    break
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        _problem(problems, str(path), f"cannot read: {exc}")
        return None
    if len(problems) > n_before:
        return None
    if not ts:
        _problem(problems, f"{path}:1", "no samples")
        return None
    name = path.name.split(".")[0]
    return BitbrainsVm(name, ts, cores, cap_mhz, usage, mem_cap_kb, mem)


def read_bitbrains(
    directory: str | os.PathLike[str], *, max_samples: int = 0, max_vms: int = 0
) -> Workload:
    """All ``*.csv[.gz]`` files of ``directory``; samples aligned by position (all 300 s)."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError([f"{root}: not a directory of Bitbrains trace files"])

    def key(p: Path) -> tuple[int, str]:
        stem = p.name.split(".")[0]
        return (int(stem), "") if stem.isdigit() else (1 << 30, stem)

    files = sorted((p for p in root.iterdir() if ".csv" in p.name), key=key)
    if max_vms:
        files = files[:max_vms]
    if not files:
        raise ConfigError([f"{root}: no *.csv or *.csv.gz trace files"])
    problems: list[str] = []
    vms = [read_bitbrains_file(p, problems, max_samples) for p in files]
    if problems:
        raise ConfigError(problems)
    good = [v for v in vms if v is not None]
    # Samples align by position (all 300 s); a VM whose trace is shorter uses nothing after it.
    n = max(len(v.timestamps_s) for v in good)
    if max_samples:
        n = min(n, max_samples)
    cpu = np.zeros((len(good), n))
    mem = np.zeros((len(good), n))
    for i, v in enumerate(good):
        m = min(n, len(v.cpu_usage_mhz))
        if v.cpu_capacity_mhz > 0:
            cpu[i, :m] = np.minimum(1.0, np.array(v.cpu_usage_mhz[:m]) / v.cpu_capacity_mhz)
        mem[i, :m] = np.array(v.mem_usage_kb[:m]) * KIB
    return Workload(
        kind="bitbrains",
        names=tuple(v.name for v in good),
        cpu_util=cpu,
        interval_s=300.0,
        vm_cores=tuple(v.cores for v in good),
        vm_cpu_mhz=tuple(v.cpu_capacity_mhz for v in good),
        vm_mem_bytes=tuple(int(v.mem_capacity_kb * KIB) for v in good),
        mem_used_bytes=mem,
    )


def is_bitbrains(directory: str | os.PathLike[str]) -> bool:
    root = Path(directory)
    return root.is_dir() and any(".csv" in p.name for p in root.iterdir())


def read_trace(directory: str | os.PathLike[str], *, max_samples: int = 0) -> Workload:
    """Detect the format from the files: ``*.csv[.gz]`` is Bitbrains, else PlanetLab."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError([f"{root}: trace directory does not exist"])
    if is_bitbrains(root):
        return read_bitbrains(root, max_samples=max_samples)
    return read_planetlab(root, max_samples=max_samples)
