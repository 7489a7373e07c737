"""A free TCP port for a rendezvous that a test or tool starts on this machine (torchrun's
``--master_port``, MASTER_PORT of forked ranks).

``bind(("127.0.0.1", 0))`` hands out a port of the kernel's ephemeral range, the range every outgoing
connection takes its local port from: gloo's connections between the ranks of another job running
at the same time (a parallel test) can take it between our check and the store's own bind, which
then fails with EADDRINUSE. Ports below that range are taken only by explicit binds, so a port
drawn at random there and found free stays free unless two picks meet (1 in ~10,000).
"""

import random
import socket

_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default lower bound


def _ephemeral_low() -> int:
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def free_port(host: str = "127.0.0.1", attempts: int = 100) -> int:
    """A port of ``host`` that is free now, drawn at random below the ephemeral range (above 10,000,
    clear of well-known services)."""
    high = _ephemeral_low()
    low = max(1024, min(10_000, high - 1_000))
    if low >= high:  # no room below the ephemeral range on this machine: the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    draw = random.SystemRandom()  # independent of the seeded global generator: concurrent runs differ
    for _ in range(attempts):
        port = draw.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on {host} in [{low}, {high}) after {attempts} draws")
