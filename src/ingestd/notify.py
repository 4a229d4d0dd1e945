"""systemd notification protocol (sd_notify) over NOTIFY_SOCKET, without libsystemd.

Owns: sending `READY=1`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1` and `STATUS=...`
datagrams to the unix socket named by `NOTIFY_SOCKET` (a path, or an abstract name
starting with `@`), and reading the watchdog interval from `WATCHDOG_USEC`.

Must not: block (datagrams are sent non-blocking; a missing or full socket is ignored
after one log line), or decide when to notify (the daemon does).
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("ingestd.notify")


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        e = os.environ if env is None else env
        addr = e.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr:
            self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = e.get("WATCHDOG_USEC", "")
        pid = e.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._warned:
                log.warning("sd_notify_failed", error=str(e))
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping: draining and committing")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", "STATUS=reloading configuration")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
