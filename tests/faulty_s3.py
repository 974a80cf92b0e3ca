"""A fault-injecting HTTP proxy in front of the loopback S3 server (moto), for storage-failure tests.

Every request is forwarded unchanged, except that while ``faults`` > 0 each request that matches
``methods`` uses up one fault and gets the configured one instead:

- ``throttle``: 503 ``SlowDown``, what S3 answers when a prefix is over its request rate;
- ``forbid``: 403 ``AccessDenied``;
- ``drop``: the upstream answer's headers and half its body, then the connection is closed;
- ``stall``: the upstream answer's headers and half its body, then nothing for ``stall_s`` seconds.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse

_ERRORS = {
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
    "forbid": (403, "AccessDenied", "Access Denied"),
}


class FaultyS3Proxy:
    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlparse(upstream).netloc
        self.mode = "throttle"
        self.faults = 0
        self.methods = ("GET", "HEAD")
        self.requests = 0  # forwarded or faulted, for assertions
        self.stall_s = 60.0
        self.stalled = threading.Event()  # set once a stalled answer is under way
        self._guard = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take_fault(self.command)
                if fault in _ERRORS:
                    status, code, text = _ERRORS[fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{text}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    # HEAD answers keep the object's Content-Length; other bodies were read whole
                    if key.lower() in ("transfer-encoding", "connection") or \
                            (key.lower() == "content-length" and self.command != "HEAD"):
                        continue
                    self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "stall" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    proxy.stalled.set()
                    time.sleep(proxy.stall_s)
                    return
                if fault == "drop" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take_fault(self, method: str) -> str | None:
        with self._guard:
            self.requests += 1
            if self.faults > 0 and method in self.methods:
                self.faults -= 1
                return self.mode
        return None

    def inject(self, mode: str, faults: int, methods=("GET", "HEAD")) -> None:
        with self._guard:
            self.mode, self.faults, self.methods = mode, faults, tuple(methods)

    def start(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
