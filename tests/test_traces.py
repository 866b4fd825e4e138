"""Trace readers: well-formed files parse; malformed ones fail naming file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from balancerd.errors import ConfigError
from balancerd.simulate.traces import read_bitbrains, read_planetlab, read_trace

HEADER = (
    "Timestamp [ms];\tCPU cores;\tCPU capacity provisioned [MHZ];\tCPU usage [MHZ];\t"
    "CPU usage [%];\tMemory capacity provisioned [KB];\tMemory usage [KB];\t"
    "Disk read throughput [KB/s];\tDisk write throughput [KB/s];\t"
    "Network received throughput [KB/s];\tNetwork transmitted throughput [KB/s]"
)


def planetlab_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "day"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def bb_row(t: int, usage_mhz: float, mem_kb: float = 1_000_000.0) -> str:
    return (
        f"{t};\t2;\t5000.0;\t{usage_mhz};\t{usage_mhz / 50:.2f};\t4194304.0;\t{mem_kb};"
        "\t0.0;\t1.0;\t0.5;\t0.5"
    )


def bitbrains_dir(tmp_path: Path, files: dict[str, list[str]]) -> Path:
    d = tmp_path / "bb"
    d.mkdir()
    for name, rows in files.items():
        with gzip.open(d / name, "wt") as fh:
            fh.write("\n".join([HEADER, *rows]) + "\n")
    return d


def test_planetlab_reads_sorted_files_as_fractions(tmp_path: Path) -> None:
    d = planetlab_dir(tmp_path, {"b": "10\n20\n30\n", "a": "0\n99\n100\n"})
    w = read_planetlab(d)
    assert w.names == ("a", "b")  # sorted file order decides the VM type
    assert w.cpu_util.shape == (2, 3)
    np.testing.assert_allclose(w.cpu_util[0], [0.0, 0.99, 1.0])
    np.testing.assert_allclose(w.cpu_util[1], [0.1, 0.2, 0.3])
    assert w.interval_s == 300.0


def test_planetlab_non_integer_names_file_and_line(tmp_path: Path) -> None:
    d = planetlab_dir(tmp_path, {"vm1": "10\n20\n", "vm2": "10\n2.5\n"})
    with pytest.raises(ConfigError) as err:
        read_planetlab(d)
    assert f"{d / 'vm2'}:2:" in str(err.value)
    assert "not an integer" in str(err.value)


def test_planetlab_out_of_range_reports_every_bad_line(tmp_path: Path) -> None:
    d = planetlab_dir(tmp_path, {"vm1": "101\n20\n-3\n"})
    with pytest.raises(ConfigError) as err:
        read_planetlab(d)
    problems = err.value.problems
    assert any(p.startswith(f"{d / 'vm1'}:1:") and "out of range" in p for p in problems)
    assert any(p.startswith(f"{d / 'vm1'}:3:") for p in problems)
    assert len(problems) == 2


def test_planetlab_short_file_names_where_it_ends(tmp_path: Path) -> None:
    d = planetlab_dir(tmp_path, {"long": "1\n2\n3\n", "short": "1\n2\n"})
    with pytest.raises(ConfigError) as err:
        read_planetlab(d)
    assert f"{d / 'short'}:3:" in str(err.value)


def test_planetlab_empty_dir_and_missing_dir(tmp_path: Path) -> None:
    d = planetlab_dir(tmp_path, {})
    with pytest.raises(ConfigError, match="no trace files"):
        read_planetlab(d)
    with pytest.raises(ConfigError, match="does not exist"):
        read_trace(tmp_path / "nope")


def test_bitbrains_reads_cpu_and_memory(tmp_path: Path) -> None:
    d = bitbrains_dir(
        tmp_path,
        {
            "2.csv.gz": [bb_row(1000, 500.0), bb_row(1300, 2500.0), bb_row(1600, 6000.0)],
            "1.csv.gz": [bb_row(1000, 0.0, 2048.0), bb_row(1300, 1000.0), bb_row(1600, 5000.0)],
        },
    )
    w = read_trace(d)
    assert w.kind == "bitbrains"
    assert w.names == ("1", "2")  # numeric order
    np.testing.assert_allclose(w.cpu_util[1], [0.1, 0.5, 1.0])  # 6000 of 5000 MHz capped
    assert w.vm_cores == (2, 2)
    assert w.vm_mem_bytes == (4194304 * 1024, 4194304 * 1024)
    assert w.mem_used_bytes[0, 0] == 2048.0 * 1024


def test_bitbrains_wrong_column_count(tmp_path: Path) -> None:
    bad = bb_row(1300, 10.0).rsplit(";", 2)[0]  # two columns short
    d = bitbrains_dir(tmp_path, {"7.csv.gz": [bb_row(1000, 10.0), bad]})
    with pytest.raises(ConfigError) as err:
        read_bitbrains(d)
    assert f"{d / '7.csv.gz'}:3:" in str(err.value)  # line 1 is the header
    assert "expected 11" in str(err.value)


def test_bitbrains_non_number_and_negative(tmp_path: Path) -> None:
    d = bitbrains_dir(
        tmp_path,
        {
            "3.csv.gz": [
                bb_row(1000, 10.0),
                bb_row(1300, 10.0).replace("5000.0", "lots"),
                bb_row(1600, -4.0),
            ]
        },
    )
    with pytest.raises(ConfigError) as err:
        read_bitbrains(d)
    msg = str(err.value)
    assert f"{d / '3.csv.gz'}:3: not a number" in msg
    assert f"{d / '3.csv.gz'}:4: negative" in msg


def test_bitbrains_timestamps_must_increase(tmp_path: Path) -> None:
    d = bitbrains_dir(tmp_path, {"4.csv.gz": [bb_row(1000, 1.0), bb_row(1000, 1.0)]})
    with pytest.raises(ConfigError, match=r"4\.csv\.gz:3: timestamp"):
        read_bitbrains(d)
