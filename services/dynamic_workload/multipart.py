"""Extracting the job's bytes from an enqueue body: raw, or ``multipart/form-data``.

curl's ``-F data=@file`` and ``-F "data=<file"`` both send a form part named ``data``; the job
is that part's content, byte for byte. The ``email`` package parses the envelope: with the
HTTP policy it leaves binary content and UTF-8 file names intact.
"""

import email.parser
import email.policy


class MultipartError(ValueError):
    """The body is not usable multipart: the message says what is wrong and how to fix it."""


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def extract_data(content_type: str, body: bytes) -> bytes:
    """Return the job's bytes: the `data` field of a form, or the raw body otherwise."""
    if not is_multipart(content_type):
        return body
    return form_field(content_type, body, "data")


def form_field(content_type: str, body: bytes, name: str) -> bytes:
    boundary = _boundary(content_type)
    if boundary is None:
        raise MultipartError("multipart/form-data without a boundary; send the form with curl -F data=@FILE")
    # The closing delimiter proves the upload arrived whole; without it the part is truncated.
    try:
        delimiter = b"--" + boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("the multipart boundary must be ASCII") from None
    if delimiter + b"--" not in body:
        raise MultipartError("multipart body has no closing delimiter; the upload was cut short")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    except Exception as error:  # the email package raises many kinds on garbage
        raise MultipartError(f"malformed multipart body: {error}") from None
    if not message.is_multipart():
        raise MultipartError("malformed multipart body: no parts found")
    names = []
    for part in message.iter_parts():
        field = part.get_param("name", header="content-disposition")
        names.append(field)
        if field == name:
            payload = part.get_payload(decode=True)
            return payload if payload is not None else b""
    shown = ", ".join(repr(n) for n in names if n) or "none"
    raise MultipartError(f"multipart form has no field {name!r} (fields: {shown}); send it with curl -F {name}=@FILE")


def _boundary(content_type: str):
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head)
    boundary = message.get_boundary()
    if not boundary or len(boundary) > 200:
        return None
    return boundary
