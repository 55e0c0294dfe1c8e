#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/: valid requests,
responses, frames and configs of the kinds the tests use, plus a few that the proxy refuses.
Run from anywhere; files are named by content, so running it again adds nothing twice."""
import hashlib, os, re, struct, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
repo = os.path.dirname(root)


def put(target, data):
    d = os.path.join(root, "corpus", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- HTTP/1 requests
REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n",
    b"GET /p?q=1 HTTP/1.1\r\nHost: api.example:8080\r\nConnection: keep-alive, x-secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nExpect: 100-continue\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX-Cutover-Preview: tok\r\n\r\n",
    b"GET http://api.example:8080/x HTTP/1.1\r\nHost: web.example\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nX-Request-Id: abc-123\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    b"GET http://user:pw@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n",
]
for i, r in enumerate(REQUESTS):
    put("request_head", bytes([i % 8]) + r)
    put("request_head", b"\x01" + r)  # as if over HTTP/2
    put("proxy_request", bytes([i % 8]) + r)
# Pipelined keep-alive requests.
put("proxy_request", b"\x07" + REQUESTS[0] + REQUESTS[5] + REQUESTS[6] + REQUESTS[16])
put("proxy_request", b"\x02" + REQUESTS[5] + REQUESTS[0])


# ---- HTTP/2
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    n = struct.pack(">I", len(payload))[1:]
    return n + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def lit(index, value):
    # Literal header field with incremental indexing, indexed name (RFC 7541 6.2.1).
    return bytes([0x40 | index, len(value)]) + value


SETTINGS = frame(0x4, 0, 0, b"")
SETTINGS_ACK = frame(0x4, 0x1, 0, b"")
GET = b"\x82\x86\x84" + lit(1, b"api.example")
POST = b"\x83\x86" + lit(4, b"/up") + lit(1, b"shop.example") + lit(28, b"5")
h2 = [
    PREFACE + SETTINGS + frame(0x1, 0x5, 1, GET),
    PREFACE + SETTINGS + SETTINGS_ACK + frame(0x1, 0x4, 1, POST) + frame(0x0, 0x1, 1, b"hello"),
    PREFACE + SETTINGS + frame(0x1, 0x1, 1, GET[:3]) + frame(0x9, 0x4, 1, GET[3:]),
    PREFACE + SETTINGS + frame(0x1, 0x4, 1, b"\x83\x86\x84" + lit(1, b"x")) + frame(0x0, 0x0, 1, b"abc") + frame(0x0, 0x1, 1, b"de"),
    PREFACE + SETTINGS + frame(0x6, 0, 0, b"\0" * 8) + frame(0x1, 0x5, 1, GET) + frame(0x1, 0x5, 3, b"\x82\x86\x84" + lit(1, b"web")) + frame(0x7, 0, 0, b"\0" * 8),
]
for i, c in enumerate(h2):
    for seed in (4, 7, 0x10 + i):
        put("proxy_request", bytes([seed]) + c)
        put("h2_frames", bytes([seed]) + c)

# ---- upstream responses
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-App: a\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n",
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
]
for i, r in enumerate(RESPONSES):
    for seed in (0, 3, 7, 8 | 7, 0x20 + i):
        put("upstream_response", bytes([seed]) + r)

# ---- WebSocket frames
def ws(opcode, payload, key=None, fin=True):
    f = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if key else 0
    n = len(payload)
    if n < 126:
        f += bytes([m | n])
    elif n <= 0xFFFF:
        f += bytes([m | 126]) + struct.pack(">H", n)
    else:
        f += bytes([m | 127]) + struct.pack(">Q", n)
    if key:
        f += key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    else:
        f += payload
    return f

frames = [
    ws(0x1, b"hello"),
    ws(0x2, b"\x07" * 126, b"\x01\x02\x03\x04"),
    ws(0x9, b""),
    ws(0x2, b"\x09" * 300),
    ws(0x1, b"", b"\x09\x09\x09\x09"),
    ws(0x1, b"frag", fin=False) + ws(0x0, b"ment"),
    ws(0x8, struct.pack(">H", 1001), b"\x05\x06\x07\x08"),
    ws(0x8, struct.pack(">H", 1000) + b"bye"),
]
for i, f in enumerate(frames):
    put("websocket_frames", bytes([7]) + f)
put("websocket_frames", bytes([0]) + b"".join(frames))
put("websocket_frames", bytes([5]) + b"".join(frames))
put("websocket_frames", bytes([2]) + b"".join(frames[:3]))

# ---- configs: the example, and every text the config tests parse.
example = open(os.path.join(repo, "crates/control/src/config.rs")).read()
m = re.search(r'pub const EXAMPLE: &str = r#"(.*?)"#;', example, re.S)
put("config", m.group(1).encode())
tests = open(os.path.join(repo, "crates/control/src/config/tests.rs")).read()
for lit_ in re.findall(r'"((?:[^"\\]|\\.)*)"', tests):
    if "\\n" not in lit_ or ("[" not in lit_ and "=" not in lit_):
        continue
    text = (lit_.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t")
            .replace('\\"', '"').replace("\0", "\\"))
    put("config", text.encode())
for target in sorted(os.listdir(os.path.join(root, "corpus"))):
    print(target, len(os.listdir(os.path.join(root, "corpus", target))), file=sys.stderr)
