"""A real multi-host libvirt cluster on one machine: network namespaces, one libvirtd each,
small TCG guests. The API is ``balancerd.lab.cluster.Lab``; the CLI is ``balancerd lab``."""
