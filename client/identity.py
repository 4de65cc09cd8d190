"""Who a deployed node is: its name (the operator's, or this host's) and the stable number
derived from it, which seeds its data split and orders its replies."""

from __future__ import annotations

import re
import socket
import zlib


def default_name() -> str:
    """A node's default name: this host's name (what an operator would call the machine)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].strip("-.") or "client"


def node_partition(name: str) -> int:
    """A deployed node's stable number (seeds, reply order, FlexLoRA rank): a hash of its name."""
    return zlib.crc32(name.encode("utf-8")) % 2**31
