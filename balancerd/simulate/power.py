"""Host power from SPECpower tables: 11 readings at 0 %, 10 %, ..., 100 % CPU, linearly
interpolated in between, as CloudSim's ``PowerModelSpecPower`` does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SpecPowerModel:
    name: str
    watts: tuple[float, ...]  # 11 readings, 0 % .. 100 % CPU in 10 % steps

    def __post_init__(self) -> None:
        if len(self.watts) != 11:
            raise ValueError(f"power model {self.name}: need 11 readings, got {len(self.watts)}")

    def power_w(self, cpu_util: float) -> float:
        """Watts at ``cpu_util`` (0..1); raises ValueError outside 0..1 like CloudSim."""
        if cpu_util < 0 or cpu_util > 1:
            raise ValueError(f"utilization {cpu_util} outside 0..1")
        if cpu_util % 0.1 == 0:
            return self.watts[int(cpu_util * 10)]
        lo = int(np.floor(cpu_util * 10))
        hi = int(np.ceil(cpu_util * 10))
        p_lo = self.watts[lo]
        delta = (self.watts[hi] - p_lo) / 10
        return p_lo + delta * (cpu_util - lo / 10) * 100


# CloudSim 3.0.3 PowerModelSpecPowerHpProLiantMl110G4Xeon3040 (SPECpower_ssj2008, 2011q1).
HP_ML110_G4 = SpecPowerModel(
    "HP ProLiant ML110 G4 (Xeon 3040)",
    (86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0),
)
# CloudSim 3.0.3 PowerModelSpecPowerHpProLiantMl110G5Xeon3075.
HP_ML110_G5 = SpecPowerModel(
    "HP ProLiant ML110 G5 (Xeon 3075)",
    (93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0),
)


class PowerTable:
    """Vectorized power of many hosts, each with its own model (index into ``models``)."""

    def __init__(self, models: list[SpecPowerModel], model_of_host: list[int]) -> None:
        self.models = models
        self.table = np.array([m.watts for m in models], dtype=np.float64)  # [model, 11]
        self.model_of_host = np.asarray(model_of_host, dtype=np.int64)

    def power_w(
        self, cpu_util: FloatArray, hosts: npt.NDArray[np.int64] | None = None
    ) -> FloatArray:
        """Watts of ``hosts`` (all hosts when None) at ``cpu_util`` (clipped to 0..1)."""
        model = self.model_of_host if hosts is None else self.model_of_host[hosts]
        u = np.clip(cpu_util, 0.0, 1.0)
        lo = np.minimum(np.floor(u * 10).astype(np.int64), 9)
        p_lo = self.table[model, lo]
        p_hi = self.table[model, lo + 1]
        watts: FloatArray = p_lo + (p_hi - p_lo) / 10 * (u - lo / 10) * 100
        return watts


# CloudSim 3.0.3 PowerModelSpecPowerIbmX3550XeonX5675 (IBM x3550 M3, 2 x Xeon X5675, 12 cores
# at 3067 MHz): the host of the built-in Bitbrains cluster.
IBM_X3550_X5675 = SpecPowerModel(
    "IBM System x3550 M3 (2 x Xeon X5675)",
    (58.4, 98.0, 109.0, 118.0, 128.0, 140.0, 153.0, 170.0, 189.0, 205.0, 222.0),
)
