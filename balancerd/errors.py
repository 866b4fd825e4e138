"""One root error for everything balancerd raises on purpose.

Only the CLI turns these into exit codes; library code raises and chains.
"""

from __future__ import annotations


class BalancerdError(Exception):
    """Root of all balancerd errors."""


class ConfigError(BalancerdError):
    """A daemon config or policy file is invalid.

    `problems` holds every problem found, each already formatted as
    ``FILE:LINE: field.path: message`` so the operator sees them all at once.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PolicyError(ConfigError):
    """A policy document is invalid."""


class HypervisorError(BalancerdError):
    """A call to a host failed; the message names the host and the operation."""

    def __init__(self, host: str, operation: str, detail: str) -> None:
        self.host = host
        self.operation = operation
        self.detail = detail
        super().__init__(f"{host}: {operation} failed: {detail}")


class SolveError(BalancerdError):
    """No valid placement: the message says which constraints conflict."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons) if self.reasons else "no placement found")


class MigrationError(BalancerdError):
    """A migration step failed; the message says what was attempted."""


class LabError(BalancerdError):
    """The lab cluster cannot be brought up or down; the message says what is missing."""
