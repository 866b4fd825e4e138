"""The daemon, split by job: ``cycle`` (inputs -> CycleReport, pure except the actions it is
handed), ``watchdog`` (liveness), ``stats`` (reports -> metrics and log lines), ``reload``
(load -> validate), and ``core.Daemon``, the composition root that wires them."""

from balancerd.daemon.core import Daemon
from balancerd.daemon.reload import Loaded, load_all

__all__ = ["Daemon", "Loaded", "load_all"]
