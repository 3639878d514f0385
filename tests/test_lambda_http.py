"""The Lambda's own HTTP/1.1 exchange with the management API (lambda_function.post):
the answers API Gateway may give and the ways a connection can fail, against a
scripted server on a real socket, in plain HTTP and in TLS."""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import lambda_function

RECIPIENT = "R1kmxc2-_VNjMCFIA="
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

# --- A scripted server: each accepted connection is handed to a function ----------------


class Server:
    """A TCP server on 127.0.0.1 that runs `serve(connection, reader)` for every
    connection it accepts; counts connections and requests."""

    def __init__(self, serve: Callable[[Server, socket.socket, Any], None], tls: Any = None):
        self.serve = serve
        self.connections = 0
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.tls = tls
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.run, args=(sock,), daemon=True).start()

    def run(self, sock: socket.socket) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            with sock:
                self.serve(self, sock, sock.makefile("rb"))
        except (OSError, ssl.SSLError):
            pass

    def read_request(self, reader: Any) -> bytes | None:
        """One request, or None when the client closed the connection."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            if not line:
                return None
            head += line
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        request = head + reader.read(length)
        self.requests.append(request)
        return request

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(serve: Callable[[Server, socket.socket, Any], None], tls: Any = None) -> Server:
        started.append(Server(serve, tls))
        return started[-1]

    yield start
    for each in started:
        each.close()


def answer_each_request_with(*answers: bytes) -> Callable[[Server, socket.socket, Any], None]:
    """Answer the requests of a connection in turn (the last answer repeats)."""

    def serve(server: Server, sock: socket.socket, reader: Any) -> None:
        number = 0
        while server.read_request(reader) is not None:
            sock.sendall(answers[min(number, len(answers) - 1)])
            number += 1

    return serve


def endpoint_posts(url: str) -> Callable[[], str]:
    """A function that posts one message to RECIPIENT through `url`'s connections
    (one ManagementApi, so connections are kept between calls), as a broadcast would."""
    api = lambda_function.open_management_api(url)
    payload = b'{"action":"message","messageBody":"hi"}'
    outgoing = lambda_function.Outgoing(
        api, payload, hashlib.sha256(payload).hexdigest(), lambda_function.signing_keys()
    )
    send = functools.partial(lambda_function.post, outgoing, RECIPIENT)
    send.api = api  # type: ignore[attr-defined]
    return send


def post_to(url: str, times: int = 1) -> list[str]:
    send = endpoint_posts(url)
    return [send() for _ in range(times)]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lambda_function, "POST_BACKOFF_SECONDS", 0.001)


# --- What goes out ----------------------------------------------------------------------


def test_a_post_is_one_http_request_with_the_signed_headers_and_the_body(server):
    endpoint = server(answer_each_request_with(OK))

    (outcome,) = post_to(f"http://127.0.0.1:{endpoint.port}/prod")

    (request,) = endpoint.requests
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert outcome == "delivered"
    assert lines[0] == "POST /prod/@connections/R1kmxc2-_VNjMCFIA%3D HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Host"] == f"127.0.0.1:{endpoint.port}"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
    assert body == b'{"action":"message","messageBody":"hi"}'


# --- Answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (b"HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n", "stale"),
        (
            b"HTTP/1.1 403 Forbidden\r\nx-amzn-ErrorType: ForbiddenException\r\n"
            b'Content-Length: 23\r\n\r\n{"message":"Forbidden"}',
            "ForbiddenException",
        ),
        (b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\n{}", "PayloadTooLargeException"),
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", "HTTP500"),
    ],
    ids=["410", "403", "413", "500"],
)
def test_each_status_is_classified_and_only_429_retried(server, answer, outcome):
    endpoint = server(answer_each_request_with(answer))

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod") == [outcome]
    assert len(endpoint.requests) == 1


def test_a_429_is_retried_on_the_same_connection_until_delivered(server):
    throttled = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}"
    endpoint = server(answer_each_request_with(throttled, throttled, OK))

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod") == ["delivered"]
    assert (len(endpoint.requests), endpoint.connections) == (3, 1)


def test_a_chunked_answer_is_read_whole_and_its_connection_kept(server):
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    endpoint = server(answer_each_request_with(chunked))

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod", times=2) == ["delivered", "delivered"]
    assert endpoint.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # no length: the body runs to the end of the connection
    ],
    ids=["connection-close", "http-1.0", "no-length"],
)
def test_a_connection_the_answer_does_not_keep_open_is_not_reused(server, answer):
    def answer_then_close(server: Server, sock: socket.socket, reader: Any) -> None:
        if server.read_request(reader) is not None:
            sock.sendall(answer)

    endpoint = server(answer_then_close)

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod", times=2) == ["delivered", "delivered"]
    assert endpoint.connections == 2


def test_http_1_0_keep_alive_is_honoured(server):
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    endpoint = server(answer_each_request_with(answer))

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod", times=2) == ["delivered", "delivered"]
    assert endpoint.connections == 1


# --- Connections that fail --------------------------------------------------------------


def test_an_idle_connection_the_server_closed_is_replaced_without_a_failed_attempt(server):
    def answer_once_then_close(server: Server, sock: socket.socket, reader: Any) -> None:
        if server.read_request(reader) is not None:
            sock.sendall(OK)

    endpoint = server(answer_once_then_close)
    send = endpoint_posts(f"http://127.0.0.1:{endpoint.port}/prod")

    first = send()
    wait_until(lambda: closed_by_peer(send.api))  # type: ignore[attr-defined]
    second = send()

    assert (first, second) == ("delivered", "delivered")
    assert (len(endpoint.requests), endpoint.connections) == (2, 2)


def test_a_connection_reset_before_the_answer_is_retried(server):
    def reset_the_first_connection(server: Server, sock: socket.socket, reader: Any) -> None:
        if server.read_request(reader) is None:
            return
        if server.connections == 1:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            return  # closing with linger 0 resets the connection
        sock.sendall(OK)

    endpoint = server(reset_the_first_connection)

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod") == ["delivered"]
    assert (len(endpoint.requests), endpoint.connections) == (2, 2)


def test_an_answer_cut_off_in_the_middle_is_retried(server):
    def cut_the_first_answer(server: Server, sock: socket.socket, reader: Any) -> None:
        if server.read_request(reader) is None:
            return
        if server.connections == 1:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            return
        sock.sendall(OK)

    endpoint = server(cut_the_first_answer)

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod") == ["delivered"]
    assert endpoint.connections == 2


def test_an_answer_that_is_not_http_is_retried_on_a_new_connection(server):
    def garbage_first(server: Server, sock: socket.socket, reader: Any) -> None:
        if server.read_request(reader) is not None:
            sock.sendall(b"SSH-2.0-nope\r\n" if server.connections == 1 else OK)

    endpoint = server(garbage_first)

    assert post_to(f"http://127.0.0.1:{endpoint.port}/prod") == ["delivered"]
    assert endpoint.connections == 2


def test_a_late_answer_is_a_read_timeout_and_not_retried(server, monkeypatch):
    monkeypatch.setattr(lambda_function, "READ_TIMEOUT_SECONDS", 0.2)
    release = threading.Event()

    def never_answer(server: Server, sock: socket.socket, reader: Any) -> None:
        server.read_request(reader)
        release.wait(5)

    endpoint = server(never_answer)
    send = endpoint_posts(f"http://127.0.0.1:{endpoint.port}/prod")
    try:
        outcome = send()
    finally:
        release.set()

    assert outcome == "ReadTimeout"
    assert len(endpoint.requests) == 1
    assert not send.api.idle  # type: ignore[attr-defined]  # dropped, never reused


def test_a_refused_connection_is_retried_then_counted_as_a_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert post_to(f"http://127.0.0.1:{port}/prod") == ["ConnectionError"]


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def tls_server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def test_posts_over_tls_are_delivered_on_one_verified_connection(server, certificate, monkeypatch):
    monkeypatch.setattr(lambda_function, "get_cert_path", lambda verify: str(certificate[0]))
    endpoint = server(answer_each_request_with(OK), tls=tls_server_context(certificate))

    assert post_to(f"https://127.0.0.1:{endpoint.port}/prod", times=2) == ["delivered", "delivered"]
    assert endpoint.connections == 1


def test_a_certificate_that_does_not_verify_fails_the_post_without_retrying(server, certificate):
    endpoint = server(answer_each_request_with(OK), tls=tls_server_context(certificate))

    assert post_to(f"https://127.0.0.1:{endpoint.port}/prod") == ["SSLError"]
    assert endpoint.connections == 1


# --- Helpers ----------------------------------------------------------------------------


def closed_by_peer(api: lambda_function.ManagementApi) -> bool:
    """Whether the endpoint's idle connection has been closed by the server."""
    (connection,) = api.idle
    readable = select.poll()
    readable.register(connection.sock, select.POLLIN)
    return bool(readable.poll(0))


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
