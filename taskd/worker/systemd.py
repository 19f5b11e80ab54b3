"""sd_notify: tell systemd about readiness, reloads, stopping and status.

The protocol is one datagram of ``KEY=value`` lines sent to the Unix socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).
Without that variable (not started by systemd) every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Optional


class Notifier:
    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET")
        self.address = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        self.watchdog_interval = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2   # ping twice per period
        self._sock = None

    def notify(self, **fields: Any) -> bool:
        """Send ``READY=1``, ``STATUS=...`` etc.; keys are given upper or lower case."""
        if self.address is None:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: Optional[str] = None) -> None:
        return self.notify(ready=1, **({"status": status} if status else {}))

    def reloading(self) -> None:
        return self.notify(reloading=1, monotonic_usec=int(time.monotonic() * 1e6))

    def stopping(self) -> None:
        return self.notify(stopping=1)

    def status(self, text: str) -> None:
        return self.notify(status=text)

    def watchdog(self) -> None:
        return self.notify(watchdog=1)
