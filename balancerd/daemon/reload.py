"""Load -> validate: the config and every policy it names, checked together."""

from __future__ import annotations

from dataclasses import dataclass

from balancerd.config import Config, cross_check_policies, load_config, resolve_relative
from balancerd.errors import ConfigError
from balancerd.policy.load import load_policy
from balancerd.policy.model import Policy


@dataclass(frozen=True)
class Loaded:
    """Config and every policy it names, validated together (swapped as one)."""

    config: Config
    policies: dict[str, Policy]  # path as written in the config -> policy

    @property
    def forecast_window_s(self) -> float:
        """How much demand history the loaded policies need."""
        return max(p.forecast.window_s for p in self.policies.values())


def load_all(config_path: str) -> Loaded:
    """Load the config and all its policies; raise ConfigError listing every problem."""
    config = load_config(config_path)
    paths = [config.policy] + [e.policy for e in config.schedule if e.policy]
    policies: dict[str, Policy] = {}
    problems: list[str] = []
    for p in dict.fromkeys(paths):
        try:
            policies[p] = load_policy(resolve_relative(config.source, p))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if not problems:
        # Rules between the config and its policies (e.g. a solve longer than the watchdog's
        # stall timeout), checked at start and before every reload's swap.
        problems.extend(cross_check_policies(config, policies))
    if problems:
        raise ConfigError(problems)
    return Loaded(config=config, policies=policies)
