"""A TCP proxy for fault tests: forwards a local port to the broker and can cut
every connection, freeze it (nothing more is forwarded, nothing is closed), half-cut
it (the client's side closed, the broker's left open and silent: a half-open
connection as the broker sees it), or stop and start listening, on demand."""
import socket
import threading


class Proxy:
    def __init__(self, target=("127.0.0.1", 5672), port=0):
        self.target = target
        self.port = port
        self._listener = None
        self._pairs = []
        self._lock = threading.Lock()
        self.accepted = 0
        self.frozen = set()         # sockets whose traffic stopped; never closed here

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data or src in self.frozen:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            if s not in self.frozen:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self):
        """Stop forwarding on every open connection, closing nothing; returns the pairs."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self.frozen.update(pair)
        return pairs

    def half_cut(self):
        """Freeze, then close the clients' side only: the broker keeps its side open."""
        for client, _upstream in self.freeze():
            client.shutdown(socket.SHUT_RDWR)
            client.close()

    def cut(self):
        """Drop every open connection (both directions), as a network failure would."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        return len(pairs)

    def stop(self):
        """Stop listening and drop every connection."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        self.cut()

    @property
    def connections(self):
        with self._lock:
            return len(self._pairs)
