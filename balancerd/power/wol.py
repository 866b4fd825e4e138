"""Wake-on-LAN: a magic packet (6 x 0xFF, then the MAC 16 times) over UDP broadcast.

WoL can only wake a host; powering off needs a command (e.g. ``ssh {host} poweroff``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence

from balancerd.power.base import PowerError
from balancerd.power.command import CommandDriver

_HEX = re.compile(r"^[0-9a-f]{12}$")


def parse_mac(mac: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff``, ``aa-bb-...`` or ``aabb.ccdd.eeff`` -> 6 bytes."""
    digits = re.sub(r"[:\-.]", "", mac.strip().lower())
    if not _HEX.match(digits):
        raise PowerError(f"bad MAC address {mac!r}")
    return bytes.fromhex(digits)


def magic_packet(mac: str) -> bytes:
    return b"\xff" * 6 + parse_mac(mac) * 16


def send_magic_packet(mac: str, address: str = "255.255.255.255", port: int = 9) -> None:
    packet = magic_packet(mac)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(packet, (address, port))


class WolDriver:
    def __init__(
        self,
        mac: str,
        broadcast: str = "255.255.255.255",
        port: int = 9,
        off_command: Sequence[str] = (),
    ) -> None:
        parse_mac(mac)  # fail at construction on a bad MAC
        self.mac = mac
        self.broadcast = broadcast
        self.port = port
        self._off = CommandDriver((), off_command)

    def power_on(self, host: str) -> None:
        try:
            send_magic_packet(self.mac, self.broadcast, self.port)
        except OSError as exc:
            raise PowerError(
                f"{host}: power on: wake-on-lan to {self.broadcast}:{self.port} failed: {exc}"
            ) from exc

    def power_off(self, host: str) -> None:
        if not self._off.off_command:
            raise PowerError(f"{host}: power off: wake-on-lan cannot power off (set off_command)")
        self._off.power_off(host)

    def is_on(self, host: str) -> bool | None:
        return None
