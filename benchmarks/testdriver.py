"""Node files for libvirt's test driver (``test:///path/node.xml``): fake hosts that
libvirt-python reaches through its real client library, with no libvirtd.

Format (libvirt's drvtest.html): ``<node>`` holds ``<cpu>`` (topology, MHz), ``<memory>``
(KiB) and one ``<domain type='test'>`` per guest; the driver starts them running.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from xml.sax.saxutils import escape

KIB = 1024


def node_xml(
    host: str,
    guests: int,
    *,
    sockets: int = 2,
    cores: int = 16,
    mhz: int = 2400,
    mem_gib: int = 256,
    guest_vcpus: int = 2,
    guest_mem_mib: int = 4096,
) -> str:
    """One test-driver host with ``guests`` running guests named ``<host>-g<i>``."""
    domains = []
    for i in range(guests):
        name = f"{host}-g{i:02d}"
        mem_kib = guest_mem_mib * KIB
        domains.append(
            f"<domain type='test'><name>{escape(name)}</name>"
            f"<uuid>{uuid.uuid5(uuid.NAMESPACE_URL, 'balancerd-test/' + name)}</uuid>"
            f"<memory unit='KiB'>{mem_kib}</memory>"
            f"<currentMemory unit='KiB'>{mem_kib}</currentMemory>"
            f"<vcpu>{guest_vcpus}</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
        )
    return (
        "<node><cpu><nodes>1</nodes>"
        f"<sockets>{sockets}</sockets><cores>{cores}</cores><threads>1</threads>"
        f"<active>{sockets * cores}</active><mhz>{mhz}</mhz><model>x86_64</model></cpu>"
        f"<memory>{mem_gib * KIB * KIB}</memory>" + "".join(domains) + "</node>\n"
    )


def write_nodes(folder: Path, hosts: int, guests: int) -> list[tuple[str, str]]:
    """``hosts`` node files in ``folder``: [(host name, test:/// URI)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(hosts):
        name = f"h{i:04d}"
        path = folder / f"{name}.xml"
        path.write_text(node_xml(name, guests))
        out.append((name, f"test://{path.resolve()}"))
    return out
