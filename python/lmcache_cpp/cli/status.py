"""The human-readable summary of a STATUS reply (``lmcache-cpp status`` and the demo)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_status"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_status(status: dict[str, Any]) -> str:
    """A human-readable summary of a STATUS reply."""
    lines: list[str] = []
    server = status.get("server", {})
    engine = status.get("engine", {})
    l1 = status.get("l1", {})
    prefetch = status.get("prefetch", {})
    store = status.get("store", {})
    if server:
        lines.append(
            f"server      {server.get('endpoint', '?')}  version {server.get('version', '?')}  "
            f"up {float(server.get('uptime_s', 0.0)):.0f} s  "
            f"clients {server.get('clients', server.get('clients_connected', '?'))}"
        )
    if l1:
        cap = int(l1.get("capacity_bytes", 0))
        used = int(l1.get("used_bytes", 0))
        pct = 100.0 * used / cap if cap else 0.0
        lines.append(
            f"L1          {_fmt_bytes(used)} of {_fmt_bytes(cap)} ({pct:.1f}%)  "
            f"objects {l1.get('objects', 0)}  leased {l1.get('leased_objects', 0)}  "
            f"read leases {l1.get('read_leases', 0)}  write leases {l1.get('write_leases', 0)}  "
            f"evictions {l1.get('evictions', 0)}"
        )
    for i, a in enumerate(status.get("l2", [])):
        lines.append(
            f"L2[{i}]       objects {a.get('objects', 0)}  {_fmt_bytes(int(a.get('bytes', 0)))}  "
            f"stores {a.get('stores', 0)}  loads {a.get('loads', 0)}  "
            f"pins {a.get('pins', 0)}  corrupt reads {a.get('corrupt_reads', 0)}"
        )
    if engine:
        lookups = int(engine.get("lookups", 0)) + int(engine.get("sync_lookups", 0))
        chunks = int(engine.get("lookup_chunks", 0))
        hits = int(engine.get("hit_chunks", 0))
        rate = 100.0 * hits / chunks if chunks else 0.0
        lines.append(
            f"lookups     {lookups}  chunks {chunks}  hits {hits} ({rate:.1f}%)  "
            f"from L1 {engine.get('l1_hit_chunks', 0)}  from L2 {engine.get('l2_hit_chunks', 0)}"
        )
        lines.append(
            f"transfers   stored {engine.get('store_chunks', 0)} chunks "
            f"(skipped {engine.get('store_skipped', 0)})  retrieved "
            f"{engine.get('retrieve_chunks', 0)} chunks  failed retrieves "
            f"{engine.get('retrieve_failures', 0)}"
        )
        lines.append(
            f"outstanding registrations {engine.get('registrations', 0)}  requests "
            f"{engine.get('requests', 0)}  tickets {engine.get('transfers', 0)}  lookup jobs "
            f"{prefetch.get('jobs', 0)}  L2 store queue {store.get('queued', 0)}"
        )
    return "\n".join(lines)
