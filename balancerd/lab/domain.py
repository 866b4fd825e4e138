"""Domain XML for a lab guest: TCG, direct kernel boot, serial console to a file."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from balancerd.lab.host import GUEST_BRIDGE


@dataclass(frozen=True)
class GuestDevices:
    """Paths resolved for one guest (as seen by every lab host)."""

    kernel: Path
    initrd: Path
    console_log: Path
    disk_path: str = ""  # "" = no disk
    disk_cache: str = "none"
    bridge: bool = False
    shmem: bool = False  # an ivshmem-plain device: libvirt refuses to migrate the guest


def guest_uuid(lab_name: str, guest: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"balancerd-lab:{lab_name}:guest:{guest}"))


def guest_mac(lab_name: str, guest: str) -> str:
    digest = hashlib.sha256(f"{lab_name}:{guest}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def domain_xml(
    *,
    lab_name: str,
    lab_dir: Path,
    name: str,
    mem_mib: int,
    vcpus: int,
    burn_pct: int,
    dirty_mib: int,
    devices: GuestDevices,
    dirty_mib_s: float = 0.0,
    fill_mib: int = 0,
) -> str:
    # TCG (type='qemu'): nested KVM is unreliable on these machines (see LAB-NOTES).
    # bd.lab names the lab dir in QEMU's command line, so leftovers can be found by it;
    cmdline = (
        f"console=ttyS0 quiet bd.lab={lab_dir} bd.name={name}"
        f" bd.burn={burn_pct} bd.dirty={dirty_mib} bd.dirtyrate={dirty_mib_s:g}"
        f" bd.fill={fill_mib}"
    )
    disk = ""
    if devices.disk_path:
        disk = (
            "    <disk type='file' device='disk'>\n"
            f"      <driver name='qemu' type='qcow2' cache={quoteattr(devices.disk_cache)}/>\n"
            f"      <source file={quoteattr(devices.disk_path)}/>\n"
            "      <target dev='vda' bus='virtio'/>\n"
            "    </disk>\n"
        )
    nic = ""
    if devices.bridge:
        nic = (
            "    <interface type='bridge'>\n"
            f"      <mac address='{guest_mac(lab_name, name)}'/>\n"
            f"      <source bridge='{GUEST_BRIDGE}'/>\n"
            "      <model type='virtio'/>\n"
            "    </interface>\n"
        )
    if devices.shmem:
        nic += (
            f"    <shmem name='{name}-shm'>\n"
            "      <model type='ivshmem-plain'/>\n"
            "      <size unit='M'>4</size>\n"
            "    </shmem>\n"
        )
    return (
        "<domain type='qemu'>\n"
        f"  <name>{name}</name>\n"
        f"  <uuid>{guest_uuid(lab_name, name)}</uuid>\n"
        f"  <description>balancerd lab {lab_name} guest</description>\n"
        f"  <memory unit='MiB'>{mem_mib}</memory>\n"
        f"  <currentMemory unit='MiB'>{mem_mib}</currentMemory>\n"
        f"  <vcpu placement='static'>{vcpus}</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        f"    <kernel>{escape(str(devices.kernel))}</kernel>\n"
        f"    <initrd>{escape(str(devices.initrd))}</initrd>\n"
        f"    <cmdline>{escape(cmdline)}</cmdline>\n"
        "  </os>\n"
        "  <features>\n"
        "    <acpi/>\n"
        "    <tcg><tb-cache unit='MiB'>32</tb-cache></tcg>\n"
        "  </features>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        f"{disk}{nic}"
        "    <serial type='file'>\n"
        f"      <source path={quoteattr(str(devices.console_log))} append='on'/>\n"
        "      <target port='0'/>\n"
        "    </serial>\n"
        "    <memballoon model='none'/>\n"
        "  </devices>\n"
        "</domain>\n"
    )
