"""Leadership as Prometheus metrics, rendered at scrape time from the coordinator."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from balancerd.coord.base import Leadership


class LeadershipCollector(Collector):
    def __init__(self, leadership: Callable[[], Leadership]) -> None:
        self._leadership = leadership

    def collect(self) -> Iterator[Metric]:
        s = self._leadership()
        leader = GaugeMetricFamily(
            "balancerd_leader",
            "1 while this instance leads (may act on the cluster), 0 while it stands by.",
            labels=["node", "backend"],
        )
        leader.add_metric([s.node, s.backend], 1.0 if s.leading else 0.0)
        yield leader
        info = GaugeMetricFamily(
            "balancerd_leader_info",
            "The instance this one sees leading (leader is empty when unknown).",
            labels=["node", "leader"],
        )
        info.add_metric([s.node, s.leader], 1.0)
        yield info
        yield GaugeMetricFamily(
            "balancerd_leader_token",
            "Fencing token while leading: the leader lock's etcd revision (0 otherwise).",
            value=float(s.token),
        )
        yield CounterMetricFamily(
            "balancerd_leader_elections",
            "Times this instance became leader.",
            value=float(s.epoch),
        )
        fenced = CounterMetricFamily(
            "balancerd_fenced_writes",
            "Fenced writes (intents, phases, power switches) by result.",
            labels=["result"],
        )
        fenced.add_metric(["ok"], float(s.fenced))
        fenced.add_metric(["refused"], float(s.refused))
        yield fenced
