"""balancerd: policy-driven load balancing for KVM/libvirt clusters."""

__version__ = "0.1.0"
