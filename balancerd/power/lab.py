"""The lab: stop and start a lab host (its libvirtd and guests) through the Lab class.

Needs root (the lab's namespaces), so it is for ``balancerd run`` on the lab, not for the
hardened systemd unit.
"""

from __future__ import annotations

from pathlib import Path

from balancerd.errors import BalancerdError
from balancerd.power.base import PowerError


class LabDriver:
    def __init__(self, lab_dir: str) -> None:
        self.lab_dir = lab_dir

    def _run(self, host: str, action: str) -> bool:
        # Imported late: only needed when switching, and it pulls in the lab machinery.
        from balancerd.lab.cluster import Lab

        try:
            lab = Lab(Path(self.lab_dir))
            if action == "on":
                lab.power_on(host)
            elif action == "off":
                lab.power_off(host)
            else:
                return lab.is_powered(host)
        except PowerError:
            raise
        except (BalancerdError, OSError) as exc:
            raise PowerError(f"{host}: power {action}: lab {self.lab_dir}: {exc}") from exc
        return True

    def power_on(self, host: str) -> None:
        self._run(host, "on")

    def power_off(self, host: str) -> None:
        self._run(host, "off")

    def is_on(self, host: str) -> bool | None:
        return self._run(host, "status")
