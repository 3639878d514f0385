"""A scripted stand-in for API Gateway's @connections endpoint, for unit tests.

A real HTTP server on 127.0.0.1 (the Lambda's real HTTP path is exercised, and
TCP connections can be counted), answering each connection id as the test
scripts it: 200 by default, or a sequence such as [429, 429, 200] or [410].
Like API Gateway, it checks every request's SigV4 signature (with the emulator's
checker, botocore's arithmetic) and answers 403 to a bad one. Answers carry
`x-amzn-ErrorType` exactly as API Gateway's do.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from local.sigv4 import verify

ERROR_TYPES = {
    400: "BadRequestException",
    403: "ForbiddenException",
    410: "GoneException",
    413: "PayloadTooLargeException",
    429: "LimitExceededException",
}


@dataclass
class Post:
    connection_id: str
    body: bytes
    headers: dict[str, str]
    path: str
    status: int


@dataclass
class ManagementApi:
    """The scripted endpoint; `url` is what CALLBACK_URL would be."""

    secrets: dict[str, str] = field(default_factory=dict)  # access key id -> secret key
    region: str = "us-east-1"
    url: str = ""
    posts: list[Post] = field(default_factory=list)
    answers: dict[str, list[int]] = field(default_factory=dict)
    tcp_connections: int = 0
    on_post: Callable[[Post], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, connection_id: str, *statuses: int) -> None:
        """Answer this id's next posts with these statuses (the last one repeats)."""
        self.answers[connection_id] = list(statuses)

    def next_status(self, connection_id: str) -> int:
        with self.lock:
            statuses = self.answers.get(connection_id)
            if not statuses:
                return 200
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]

    def posts_to(self, connection_id: str) -> list[Post]:
        return [post for post in self.posts if post.connection_id == connection_id]

    def delivered(self) -> dict[str, list[bytes]]:
        """Connection id -> bodies answered 200."""
        result: dict[str, list[bytes]] = defaultdict(list)
        for post in self.posts:
            if post.status == 200:
                result[post.connection_id].append(post.body)
        return result


def serve(api: ManagementApi) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as API Gateway does

        def setup(self) -> None:
            super().setup()
            with api.lock:
                api.tcp_connections += 1

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            connection_id = unquote(self.path.rsplit("/@connections/", 1)[-1])
            problem = verify(
                method="POST",
                host=self.headers["Host"],
                raw_path=self.path,
                headers=dict(self.headers.items()),
                body=body,
                secrets=api.secrets,
                region=api.region,
            )
            status = 403 if problem else api.next_status(connection_id)
            post = Post(connection_id, body, dict(self.headers.items()), self.path, status)
            with api.lock:
                api.posts.append(post)
            if api.on_post:
                api.on_post(post)
            self.send_response(status)
            if status != 200:
                self.send_header("x-amzn-ErrorType", ERROR_TYPES.get(status, "InternalError"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}/test"
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    return server
