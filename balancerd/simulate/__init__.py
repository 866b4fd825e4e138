"""Trace-driven simulation: replay a workload trace through a placement controller on an
in-memory cluster and account energy and SLA the way the CloudSim consolidation
experiments do (Beloglazov & Buyya, CCPE 2012)."""
