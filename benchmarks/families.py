"""Synthetic cluster families for the balance benchmark (seeded, deterministic).

Every family starts *memory-crowded and skewed*: ``crowded_share`` of the guests sit on
the first ``crowded_hosts`` share of the hosts, whose memory is filled to 97-100 %; the
rest spread over the other hosts. Each guest's CPU demand is drawn in 0.2-4 cores and the
whole draw is scaled so that the total is ``cpu_demand`` x the cluster's cores (0.5 = half
the capacity, 1.3 = over-subscribed by 30 %), then clipped to 0.2-4 cores per guest
where scaling allows.

- ``uniform``: every host 32 cores / 256 GiB (the case of issue 12);
- ``hetero``: four host shapes of different size *and* memory per core
  (16/128, 32/192, 48/384, 64/768 cores/GiB), so CPU and memory bounds pull apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from balancerd.model import Host, Snapshot, Vm

GIB = 1024**3
MIB = 1024**2

UNIFORM = ((32, 256),)
HETERO = ((16, 128), (32, 192), (48, 384), (64, 768))


@dataclass(frozen=True)
class Family:
    name: str  # uniform | hetero
    cpu_demand: float  # total guest CPU demand / total host cores
    crowded_share: float = 0.7  # of the guests ...
    crowded_hosts: float = 0.5  # ... start on this share of the hosts

    @property
    def label(self) -> str:
        return f"{self.name}-cpu{round(self.cpu_demand * 100)}"


def _mem_sizes(rnd: random.Random, n: int, fill_bytes: float) -> list[int]:
    """n guest memory sizes (multiples of 256 MiB, at least 512 MiB) summing to at most
    fill_bytes and close to it."""
    raw = [rnd.choice((2, 4, 4, 8, 8, 12, 16)) * GIB for _ in range(n)]
    scale = fill_bytes / sum(raw)
    step = 256 * MIB
    sizes = [max(2 * step, int(r * scale) // step * step) for r in raw]
    # top up the smallest guests with what rounding left, one step at a time
    left = int(fill_bytes) - sum(sizes)
    i = 0
    order = sorted(range(n), key=lambda k: sizes[k])
    while left >= step and n:
        sizes[order[i % n]] += step
        left -= step
        i += 1
    return sizes


def generate(family: Family, n_hosts: int, n_guests: int, seed: int) -> Snapshot:
    rnd = random.Random(f"{family.name}:{n_hosts}:{n_guests}:{seed}:{family.cpu_demand}")
    shapes = UNIFORM if family.name == "uniform" else HETERO
    hosts = []
    for i in range(n_hosts):
        cores, gib = shapes[i % len(shapes)] if len(shapes) > 1 else shapes[0]
        hosts.append(
            Host(name=f"h{i:04d}", uri=f"test:///h{i}", up=True, cpus=cores, mem_bytes=gib * GIB)
        )
    n_hot = max(1, round(n_hosts * family.crowded_hosts))
    n_hot_guests = round(n_guests * family.crowded_share)
    hot = list(range(n_hot))
    cold = list(range(n_hot, n_hosts)) or hot
    # crowded hosts: guests in proportion to their memory, memory 97-100 % full
    placement: list[int] = []
    mem: list[int] = []
    hot_mem = sum(hosts[h].mem_bytes for h in hot)
    given = 0
    for k, h in enumerate(hot):
        cnt = (
            n_hot_guests - given
            if k == len(hot) - 1
            else round(n_hot_guests * hosts[h].mem_bytes / hot_mem)
        )
        cnt = max(1, cnt)
        given += cnt
        mem += _mem_sizes(rnd, cnt, hosts[h].mem_bytes * rnd.uniform(0.97, 1.0))
        placement += [h] * cnt
    # the others: the same size mix, spread by memory share, never above 90 %
    used = [0] * n_hosts
    for h, m in zip(placement, mem, strict=True):
        used[h] += m
    cold_w = [hosts[h].mem_bytes for h in cold]
    for _ in range(n_guests - len(placement)):
        m = rnd.choice((2, 4, 4, 8, 8, 12, 16)) * GIB
        for _try in range(50):
            h = rnd.choices(cold, cold_w)[0]
            if used[h] + m <= 0.9 * hosts[h].mem_bytes:
                break
        used[h] += m
        placement.append(h)
        mem.append(m)
    # CPU demand: 0.2-4 cores each, scaled to the family's share of all cores
    raw = [rnd.uniform(0.2, 4.0) for _ in placement]
    want = family.cpu_demand * sum(h.cpus for h in hosts)
    scale = want / sum(raw)
    cores = [c * scale for c in raw]
    vms = []
    for j, (h, m, c) in enumerate(zip(placement, mem, cores, strict=True)):
        vcpus = max(1, min(32, int(c * 2) + 1))
        vms.append(
            Vm(
                name=f"vm{j:05d}",
                uuid=f"u{j}",
                host=hosts[h].name,
                state="running",
                vcpus=vcpus,
                mem_bytes=m,
                cpu_util=min(1.0, c / vcpus),
            )
        )
    return Snapshot(taken_at_s=0.0, hosts=tuple(hosts), vms=tuple(vms))


FAMILIES = tuple(
    Family(name, share) for name in ("uniform", "hetero") for share in (0.5, 0.66, 0.9, 1.1, 1.3)
)
