"""What the Redis server itself says about keeping medq's state: whether it writes anything
to disk, and whether it restarted. A batch whose job states vanished is explained with it
(``medq.core.errors.BatchGone``): "Redis restarted 4 s ago and keeps nothing on disk" is
the usual cause, and the one a purge or an expiry never shows.

INFO is enough for all of it; CONFIG (the ``save`` points) may be refused by an ACL or a
managed Redis, and is then left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class ServerLife:
    """One reading of the server: its run (a new ``run_id`` at every start) and its persistence."""

    run_id: str
    uptime_s: int
    aof: bool  # appendonly yes
    aof_fsync: str | None  # always / everysec / no; None if CONFIG is refused
    rdb_saves: bool | None  # any ``save`` point; None if CONFIG is refused

    @property
    def keeps_nothing(self) -> bool:
        """A restart loses every key: no append-only file, no snapshot points."""
        return not self.aof and self.rdb_saves is False


def server_life(r: redis.Redis) -> ServerLife | None:
    """The server's run and persistence now; None if it cannot be read."""
    try:
        info = r.info("server") | r.info("persistence")
    except redis.RedisError:
        return None
    fsync = saves = None
    try:
        conf = {_s(k): _s(v) for k, v in {**r.config_get("appendfsync"), **r.config_get("save")}.items()}
        fsync = conf.get("appendfsync") or None
        saves = bool(conf.get("save", "").strip())
    except redis.RedisError:
        pass
    return ServerLife(
        run_id=str(info.get("run_id", "")),
        uptime_s=int(info.get("uptime_in_seconds", 0)),
        aof=bool(int(info.get("aof_enabled", 0))),
        aof_fsync=fsync,
        rdb_saves=saves,
    )


def restart_note(now: ServerLife | None, before: ServerLife | None = None) -> str:
    """A few words on the server for a message about lost state: whether it restarted since
    ``before`` (or how long it has been up) and what it keeps on disk; "" if unknown."""
    if now is None:
        return ""
    if before is not None and before.run_id and now.run_id != before.run_id:
        parts = [f"Redis restarted while medq waited (up {now.uptime_s} s)"]
    else:
        parts = [f"Redis has been up {now.uptime_s} s"]
    if now.keeps_nothing:
        parts.append("it keeps nothing on disk (appendonly no, no save points)")
    elif now.aof:
        parts.append(f"it keeps an append-only file (appendfsync {now.aof_fsync or '?'})")
    elif now.rdb_saves:
        parts.append("it keeps snapshots only (save points, no append-only file): writes since the last one are lost")
    return "; ".join(parts)


def _s(x: object) -> str:
    return x.decode() if isinstance(x, bytes) else str(x or "")
