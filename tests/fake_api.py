"""A fake hosted-model API on 127.0.0.1: it records every request and answers with a function.

`respond(path, headers, body, n)` sees the request path, its headers (lower-case names), its JSON
body and its number (1, 2, ...), and returns (status, headers, JSON body or text), or DROP to close
the connection without answering. The raw bytes of each body are kept in `raw`, for checks that
need them (a SigV4 signature covers the exact bytes).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = tuple[int, dict[str, str], object]  # status, headers, JSON body (or text)
DROP = None  # respond's answer for "close the connection without a response"


class FakeAPI:
    """An HTTP server on 127.0.0.1 that records requests and answers with `respond`."""

    def __init__(self, respond: Callable[[str, dict, dict, int], Reply | None]):
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        self.raw: list[bytes] = []
        lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with lock:
                    api.requests.append((self.path, headers, json.loads(raw)))
                    api.raw.append(raw)
                    n = len(api.requests)
                answer = respond(self.path, headers, api.requests[n - 1][2], n)
                if answer is DROP:
                    self.close_connection = True
                    return
                status, extra, payload = answer
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fake_api(respond: Callable[[str, dict, dict, int], Reply | None]) -> Iterator[FakeAPI]:
    api = FakeAPI(respond)
    try:
        yield api
    finally:
        api.close()


def openai_reply(text: str) -> Reply:
    return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def anthropic_reply(text: str) -> Reply:
    return 200, {}, {"content": [{"type": "text", "text": text}], "role": "assistant"}
