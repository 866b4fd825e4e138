"""Placement: problem building, greedy stages, the ILP, verification, explanations."""

from balancerd.solve.core import SolveResult, objective_value, solve
from balancerd.solve.explain import explain_infeasible
from balancerd.solve.problem import HostCapacity
from balancerd.solve.verify import Violation, blocking, verify

__all__ = [
    "HostCapacity",
    "SolveResult",
    "Violation",
    "blocking",
    "explain_infeasible",
    "objective_value",
    "solve",
    "verify",
]
