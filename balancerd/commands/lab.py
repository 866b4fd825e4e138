"""``balancerd lab up|down|status|prepare``: a real multi-host libvirt cluster on this machine."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from balancerd.lab.cluster import (
    DEFAULT_GUESTS,
    DEFAULT_LAB_BASE,
    DEFAULT_NAME,
    DEFAULT_SUBNET,
    GUEST_SYNTAX,
    REPO_POLICY,
    GuestSpec,
    Lab,
    LabSpec,
    LabStatus,
    parse_guest_specs,
)

EPILOG = f"""\
Each lab host is a network namespace with its own libvirtd answering on
qemu+tcp://SUBNET.(10+N)/system (no auth: lab only), or with --tls only on
qemu+tls://SUBNET.(10+N)/system with x509 client certificates (a lab CA, a server and
client certificate per host, balancerd's client folder DIR/pki/balancerd, named
pki_dir in the config, and DIR/pki/untrusted, a client no host accepts; certtool from
gnutls-bin makes them); guests are small TCG domains
(Debian cloud kernel + busybox initramfs) that burn CPU and/or dirty memory.
Needs root and Debian's libvirt-daemon-system, qemu-system-x86, qemu-utils,
busybox-static, cpio, gcc (scripts/setup.sh installs them).

--guests syntax: {GUEST_SYNTAX}.
  e.g. --guests web1:host1:128:1:50,db1:host2:256:1:20:96:disk=shared,net1:host1:bridge=1
Default guests (imbalanced demo): six 128 MiB guests all on host1, burning
{", ".join(f"{g.name}={g.burn_pct}%" for g in DEFAULT_GUESTS)} of one vCPU.

`up` writes DIR/balancerd.yaml (daemon config: hosts, policy, state_dir, metrics);
point the daemon at that file. Default DIR is
{DEFAULT_LAB_BASE}/NAME. `down` removes every process, namespace, link and file of the lab.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", type=Path, help=f"lab directory (default {DEFAULT_LAB_BASE}/NAME)")
        p.add_argument(
            "--name", help=f"lab name: prefix of its netns/links (default {DEFAULT_NAME})"
        )

    up = sub.add_parser("up", help="bring the lab up (idempotent) and write its daemon config")
    up.formatter_class = argparse.RawDescriptionHelpFormatter
    up.epilog = EPILOG
    common(up)
    up.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    up.add_argument("--guests", help="guest list (see below); default: the demo set")
    up.add_argument("--no-guests", action="store_true", help="start no guests")
    up.add_argument(
        "--subnet", help=f"first three octets of the lab /24 (default {DEFAULT_SUBNET})"
    )
    up.add_argument("--host-cpus", type=int, default=2, help="capacity per host in the config")
    up.add_argument("--host-mem-mib", type=int, default=2048, help="memory per host in the config")
    up.add_argument(
        "--policy", default="", help=f"policy path for the config (default {REPO_POLICY})"
    )
    up.add_argument(
        "--metrics-listen", default="127.0.0.1:9177", help="metrics address in the config"
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="libvirtd listens only on TLS with client certificates; migrations can be encrypted",
    )

    down = sub.add_parser("down", help="stop and remove everything of the lab")
    common(down)

    status = sub.add_parser("status", help="show hosts, daemons and guests")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("prepare", help="build the guest kernel/initramfs cache only")


def _lab_dir(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    return DEFAULT_LAB_BASE / (args.name or DEFAULT_NAME)


def run(args: argparse.Namespace) -> int:
    action = args.lab_command
    if action == "prepare":
        from balancerd.lab.images import ensure_images

        images = ensure_images()
        print(f"kernel: {images.kernel}\ninitrd: {images.initrd}")
        return 0
    root = _lab_dir(args)
    if action == "up":
        if args.no_guests:
            guests: tuple[GuestSpec, ...] = ()
        elif args.guests:
            guests = parse_guest_specs(args.guests)
        else:
            guests = DEFAULT_GUESTS
        spec = LabSpec(
            hosts=args.hosts,
            guests=guests,
            host_cpus=args.host_cpus,
            host_mem_mib=args.host_mem_mib,
            policy=args.policy,
            metrics_listen=args.metrics_listen,
            tls=args.tls,
        )
        lab = Lab(root, args.name, args.subnet)
        started = time.monotonic()
        config = lab.up(spec)
        elapsed_s = time.monotonic() - started
        if not spec.policy and not REPO_POLICY.exists():
            print(f"warning: {REPO_POLICY} does not exist yet; edit 'policy:' in {config}")
        _print_status(lab.status())
        print(f"lab {lab.name} up in {elapsed_s:.1f} s; daemon config: {config}")
        return 0
    lab = Lab(root, args.name)
    if action == "down":
        lab.down()
        print(f"lab {lab.name} down: {root} removed")
        return 0
    status = lab.status()
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        _print_status(status)
    return 0 if status.healthy else 1


def _print_status(status: LabStatus) -> None:
    if not status.up:
        print(f"lab {status.name}: not up ({status.root})")
        return
    print(f"lab {status.name} ({status.root}) subnet {status.subnet}.0/24")
    for h in status.hosts:
        state = "answers" if h.answers else ("powered off" if not h.powered else "NOT answering")
        print(f"  {h.name:7} {h.uri:32} libvirtd {state}")
        for g in h.guests:
            print(f"      {g.name:16} {g.state}")
