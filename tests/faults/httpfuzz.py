"""Hypothesis strategies for hostile HTTP requests, written as raw bytes.

A generated request knows whether it is complete (request line, headers and a body that matches
its framing all sent) or cut short. A complete request must get a whole answer; an incomplete one
is sent, the sending side shut, and must get an answer or a close, never a hang.
"""

import dataclasses
import urllib.parse

from hypothesis import strategies as st

METHODS = ["GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PROPFIND",
           "get", "Put", "M-SEARCH"]
HEADER_NAMES = ["Content-Type", "Content-Length", "Transfer-Encoding", "Expect", "Connection", "Host",
                "Authorization", "X-Worker-Id", "Accept", "Accept-Encoding", "Cookie", "Range",
                "Content-Encoding", "If-None-Match", "Upgrade", "X-Forwarded-For"]
CONTENT_TYPES = [
    "application/octet-stream", "application/json", "text/plain; charset=utf-8", "", "multipart/form-data",
    "multipart/form-data; boundary=", 'multipart/form-data; boundary=""', "multipart/mixed; boundary=b",
    "MULTIPART/FORM-DATA; BOUNDARY=b", "multipart/form-data; charset=utf-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary*=utf-8''%62", "multipart/form-data; boundary*0=a; boundary*1=b",
    "image/png", "*/*", ";;;", "multipart/form-data; boundary=" + "x" * 300,
]

ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
any_text = st.text(max_size=30)
small_ints = st.integers(min_value=-3, max_value=1200).map(str)
odd_numbers = st.sampled_from(["", " ", "0", "-1", "+5", "1e3", "0x10", "1.5", "٣", "١٠", "9" * 25, "00001",
                               " 7 ", "NaN", "true", "null", "%00", "1;2", "3\t"])
values = st.one_of(small_ints, odd_numbers, ascii_text, any_text)
# Header values hold no line break: broken header lines are made on purpose, below.
header_values = values.map(lambda v: v.replace("\r", " ").replace("\n", " "))
MALFORMED_HEADER_LINES = [
    " folded: continuation", "\tX-Folded: tab", "NoColonHere", "Bad Name: x", "X-Spaced : before colon",
    ": no name", "X-Long: " + "v" * 70_000, "X-Nul: a\x00b", "X-Bytes: \xff\xfe",
]


def quote(text):
    return urllib.parse.quote(text, safe="/%=&?;+:@,$!*'()~-._")


@st.composite
def query_strings(draw, keys):
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(keys), ascii_text), values), max_size=4))
    mode = draw(st.sampled_from(["encoded", "raw", "none"]))
    if mode == "none" or not pairs:
        return draw(st.sampled_from(["", "?", "?&", "?=", "?==&&"]))
    if mode == "encoded":
        return "?" + urllib.parse.urlencode(pairs)
    return "?" + "&".join(f"{k}={quote(v)}" for k, v in pairs)


@st.composite
def paths(draw, routes):
    base = draw(st.one_of(st.sampled_from(routes), st.sampled_from(routes).map(lambda r: r + "/"),
                          st.lists(st.one_of(ascii_text, any_text), min_size=1, max_size=4)
                          .map(lambda parts: "/" + "/".join(quote(p) for p in parts)),
                          st.sampled_from(["*", "//", "/..", "/%2e%2e/", "http://127.0.0.1/healthz", "/%00",
                                           "/jobs/" + "a" * 65, "/jobs/%2F", "/jobs/é", "/jobs/a b"])))
    return base


@st.composite
def multipart_bodies(draw):
    boundary = draw(st.one_of(st.sampled_from(["b", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "x" * 70, "a b",
                                               "é", '"q"']),
                              st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                                      max_size=40),
                              st.text(min_size=1, max_size=10)))
    quoted = draw(st.booleans())
    declared = f'"{boundary}"' if quoted else boundary
    header = draw(st.sampled_from([f"multipart/form-data; boundary={declared}",
                                   f"multipart/form-data;boundary={declared};charset=utf-8",
                                   f"multipart/form-data; name=x; boundary={declared}",
                                   f"multipart/form-data; boundary*=utf-8''{quote(boundary)}",
                                   f"multipart/form-data; boundary*=x-unknown''{quote(boundary)}",
                                   "multipart/form-data"]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.just("data"), st.sampled_from(["file", "DATA", "", "data\"", "dat a"]),
                              ascii_text))
        disposition = draw(st.sampled_from([
            f'form-data; name="{name}"', f"form-data; name={name}", f'form-data; name="{name}"; filename="f.bin"',
            f"form-data; name*=utf-8''{quote(name)}", "form-data", "attachment", "",
            f'form-data; name="{name}"; filename*=utf-8\'\'%e2%82%ac']))
        extra = draw(st.sampled_from(["", "Content-Type: application/octet-stream\r\n",
                                      "Content-Transfer-Encoding: base64\r\n",
                                      "Content-Transfer-Encoding: quoted-printable\r\n",
                                      "Content-Transfer-Encoding: x-garbage\r\n",
                                      "Content-Type: multipart/mixed; boundary=inner\r\n",
                                      "Content-Type: text/plain; charset=x-unknown\r\n"]))
        content = draw(st.binary(max_size=200))
        head = (f"Content-Disposition: {disposition}\r\n" if disposition else "") + extra
        parts.append(b"--" + boundary.encode("utf-8") + b"\r\n" + head.encode("utf-8") + b"\r\n" + content + b"\r\n")
    closing = draw(st.sampled_from([b"--" + boundary.encode("utf-8") + b"--\r\n",
                                    b"--" + boundary.encode("utf-8") + b"--", b"", b"--" + boundary.encode("utf-8")]))
    preamble = draw(st.sampled_from([b"", b"preamble\r\n", b"\r\n"]))
    return header, preamble + b"".join(parts) + closing


@dataclasses.dataclass
class FuzzRequest:
    pieces: list
    complete: bool
    method: str
    target: str
    version: str
    delay: float

    @property
    def head_request(self):
        return self.method == "HEAD"

    def describe(self):
        whole = b"".join(self.pieces)
        return f"{'complete' if self.complete else 'cut short'} {whole[:300]!r}{'...' if len(whole) > 300 else ''}"


def rarely(draw, one_in):
    """True about once in `one_in` draws (a middle value, so that shrinking does not favour it)."""
    return draw(st.integers(1, one_in)) == (one_in + 1) // 2


@st.composite
def requests(draw, routes, query_keys, auth_values=None, max_body=600, plausible=()):
    """A raw request against `routes`; `auth_values`, when given, are Authorization values to try.

    `plausible` lists (method, path, {query key: (low, high)}) of the real routes: two requests in
    three start from one of them, with in-range numbers most of the time, so that the fuzzing
    reaches the code behind validation (multipart parsing, the store), not only the 404s.
    """
    extra_headers = []
    if plausible and not rarely(draw, 3):
        method, path, ranges = draw(st.sampled_from(plausible))
        path = path.replace("<id>", draw(st.one_of(st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
                                                   st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))))
        pairs = []
        for key, (low, high) in ranges.items():
            if not rarely(draw, 6):
                value = str(draw(st.integers(low, high))) if not rarely(draw, 4) else draw(values)
                pairs.append((key, value))
        target = path + ("?" + urllib.parse.urlencode(pairs) if pairs else "")
        if not rarely(draw, 4):
            extra_headers.append(("X-Worker-Id", draw(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))))
    else:
        method = draw(st.one_of(st.sampled_from(METHODS), st.from_regex(r"[A-Za-z_-]{1,12}", fullmatch=True)))
        target = draw(paths(routes)) + draw(query_strings(query_keys))
    version = draw(st.one_of(st.just("HTTP/1.1"), st.just("HTTP/1.1"), st.just("HTTP/1.0"),
                             st.sampled_from(["HTTP/1.2", "HTTP/1", "HTTP/1.1.1", "HTTP/x.y", "http/1.1", "HTTP/01.1",
                                              "HTTP/1.10", "HTTP/2.0", "HTTP/3"])))
    headers = ([("Host", "127.0.0.1")] if draw(st.booleans()) else []) + extra_headers
    body = b""
    if method in ("PUT", "POST") and not rarely(draw, 4):
        kind = draw(st.sampled_from(["multipart", "raw"]))
    else:
        kind = draw(st.sampled_from(["multipart", "raw", "json", "none"]))
    if kind == "raw":
        body = draw(st.binary(max_size=max_body))
        if draw(st.booleans()):
            headers.append(("Content-Type", draw(st.sampled_from(CONTENT_TYPES))))
    elif kind == "multipart":
        content_type, body = draw(multipart_bodies())
        headers.append(("Content-Type", content_type))
    elif kind == "json":
        body = draw(st.sampled_from([b"{}", b"[]", b"null", b'{"result": "' + b"a" * 128 + b'", "duration": 1}',
                                     b'{"result": 5}', b'{"duration": -1, "result": "' + b"0" * 128 + b'"}',
                                     b"{", b'"\xff"', b"1e999", b'{"result": "' + b"A" * 128 + b'"}']))
        headers.append(("Content-Type", "application/json"))
    if auth_values is not None and not rarely(draw, 3):
        headers.append(("Authorization", draw(st.sampled_from(auth_values))))
    for _ in range(draw(st.integers(0, 3))):
        headers.append((draw(st.one_of(st.sampled_from(HEADER_NAMES),
                                       st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True))),
                        draw(header_values)))
    malformed = []
    if rarely(draw, 10):
        malformed = [draw(st.sampled_from(MALFORMED_HEADER_LINES))]
    elif rarely(draw, 30):
        malformed = [f"X-Many-{n}: {n}" for n in range(120)]  # more than http.server's 100
    framing = "length" if not rarely(draw, 2) else draw(st.sampled_from(
        ["chunked", "none", "short", "long", "bad-length", "double-length", "expect", "length"]))
    complete = True
    encoded_body = body
    if framing in ("length", "expect"):
        headers.append(("Content-Length", str(len(body))))
        if framing == "expect":
            headers.append(("Expect", "100-continue"))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 64), max_size=4))
        chunks, rest = [], body
        for size in sizes:
            piece, rest = rest[:size], rest[size:]
            if piece:
                chunks.append(b"%x\r\n" % len(piece) + piece + b"\r\n")
        if rest:
            chunks.append(b"%x\r\n" % len(rest) + rest + b"\r\n")
        ending = draw(st.sampled_from([b"0\r\n\r\n", b"0\r\n\r\n", b"0;ext=1\r\nTrailer: x\r\n\r\n", b"zz\r\n",
                                       b"0\r\n"]))
        complete = ending != b"0\r\n"  # zz is a complete (malformed) chunk line: it must be answered
        encoded_body = b"".join(chunks) + ending
    elif framing == "none":
        encoded_body = b""  # a body without framing is not sent: the request ends at its headers
    elif framing == "short":
        headers.append(("Content-Length", str(len(body) + draw(st.integers(1, 100)))))
        complete = False
    elif framing == "long":
        if body:
            cut = draw(st.integers(0, len(body) - 1))
            headers.append(("Content-Length", str(cut)))
            encoded_body = body[:cut] + body[cut:]  # the rest is the start of a next request
    elif framing == "bad-length":
        headers.append(("Content-Length", draw(st.sampled_from(["-1", "abc", "1.5", " ", "0x10", "+3", "9" * 30]))))
    elif framing == "double-length":
        headers.append(("Content-Length", str(len(body))))
        headers.append(("Content-Length", str(len(body) + 1)))
    lines = [f"{method} {target} {version}"] + [f"{k}: {v}" for k, v in headers] + malformed
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    raw = head + encoded_body
    if rarely(draw, 10):  # cut anywhere: truncated
        cut = draw(st.integers(0, len(raw) - 1))
        raw = raw[:cut]
        complete = False
    delay = 0.0
    pieces = [raw]
    if rarely(draw, 8):  # slow: a few pieces, a few milliseconds apart
        count = draw(st.integers(2, 6))
        step = max(1, len(raw) // count)
        pieces = [raw[i:i + step] for i in range(0, len(raw), step)]
        delay = draw(st.sampled_from([0.005, 0.02, 0.05]))
    return FuzzRequest(pieces, complete, method, target, version, delay)
