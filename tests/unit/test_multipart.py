"""Extracting the job's bytes from an enqueue body, exactly as curl -F sends it."""

import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import unit_support  # noqa: F401  (services/ on sys.path)
from dynamic_workload.multipart import MultipartError, extract_data

BOUNDARY = "------------------------d74496d66958873e"


def form_part(name, content, filename=None, content_type="application/octet-stream"):
    """One part as curl writes it: -F name=@file (filename and type) or -F "name=<file" (neither)."""
    disposition = f'Content-Disposition: form-data; name="{name}"'
    headers = disposition.encode()
    if filename is not None:
        headers += b'; filename="' + filename.encode("utf-8") + b'"'
    headers += b"\r\n"
    if content_type is not None and filename is not None:
        headers += f"Content-Type: {content_type}\r\n".encode()
    return headers + b"\r\n" + content


def curl_form(parts, boundary=BOUNDARY):
    """The body and Content-Type curl sends for a form with these parts."""
    delimiter = b"--" + boundary.encode()
    body = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts) + delimiter + b"--\r\n"
    return f"multipart/form-data; boundary={boundary}", body


def test_all_byte_values_crlfs_and_a_boundary_like_line_come_out_byte_exact():
    data = (
        bytes(range(256))
        + b"\r\n\r\n"
        + b"--" + BOUNDARY.encode() + b"x\r\n"             # the boundary, but a longer line
        + b"--" + BOUNDARY[:-1].encode() + b"--\r\n"       # a shorter, closing-looking line
        + b"--other-boundary--\r\n"
        + b"Content-Disposition: form-data; name=\"data\"\r\n\r\n"
        + b"\r\r\n\n\r"
        + bytes(range(255, -1, -1))
        + b"\r\n"
    )
    content_type, body = curl_form([form_part("data", data, filename="blob.bin")])
    assert extract_data(content_type, body) == data


@pytest.mark.parametrize("data", [b"x", b"\r", b"\n", b"\r\n", b"a\r", b"\n\r", b"\r\n\r\n", b" \t", b"\x00", b"\xff\xfe"])
def test_short_payloads_with_line_endings_at_the_edges_keep_every_byte(data):
    content_type, body = curl_form([form_part("data", data, filename="f")])
    assert extract_data(content_type, body) == data


def test_a_utf8_file_name_does_not_disturb_the_content():
    data = "données du job, 日本語\n".encode("utf-8") + bytes(range(32))
    content_type, body = curl_form([form_part("data", data, filename="données-日本語 (1).bin")])
    assert extract_data(content_type, body) == data


def test_a_field_sent_without_a_file_name_is_used():
    # curl -F "data=<file" sends the file's content as a plain field: name="data", no filename.
    data = b"line one\r\nline two\nline three\r\n"
    content_type, body = curl_form([form_part("data", data)])
    assert b"filename" not in body
    assert extract_data(content_type, body) == data


def test_the_data_field_is_found_among_other_fields():
    data = b"the job"
    content_type, body = curl_form([
        form_part("note", b"not this"),
        form_part("data", data, filename="job.bin"),
        form_part("more", b"nor this", filename="other.bin"),
    ])
    assert extract_data(content_type, body) == data


def test_an_empty_data_field_gives_empty_bytes():
    content_type, body = curl_form([form_part("data", b"", filename="empty")])
    assert extract_data(content_type, body) == b""


def test_the_media_type_is_matched_case_insensitively():
    content_type, body = curl_form([form_part("data", b"abc", filename="f")])
    assert extract_data(content_type.replace("multipart/form-data", "Multipart/Form-Data"), body) == b"abc"


def test_a_quoted_boundary_parameter_is_understood():
    content_type, body = curl_form([form_part("data", b"abc", filename="f")])
    assert extract_data(f'multipart/form-data; boundary="{BOUNDARY}"', body) == b"abc"


@pytest.mark.parametrize("content_type", [
    "", "application/octet-stream", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
    "multipart/mixed; boundary=" + BOUNDARY,
])
def test_raw_bodies_pass_through_untouched(content_type):
    # Even a body that looks like a form is the data itself when it is not sent as a form.
    _, body = curl_form([form_part("data", b"inner", filename="f")])
    assert extract_data(content_type, body) == body
    raw = bytes(range(256)) * 3
    assert extract_data(content_type, raw) == raw


def test_no_boundary_is_refused_with_a_message_saying_so():
    _, body = curl_form([form_part("data", b"abc", filename="f")])
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; charset=utf-8"):
        with pytest.raises(MultipartError, match="boundary"):
            extract_data(content_type, body)


def test_a_body_without_the_closing_delimiter_is_refused_as_cut_short():
    content_type, body = curl_form([form_part("data", b"x" * 1000, filename="f")])
    for cut in (len(body) - 3, len(body) // 2, 10, 0):
        with pytest.raises(MultipartError, match="closing delimiter"):
            extract_data(content_type, body[:cut])


def test_a_form_without_a_data_field_names_the_fields_it_has():
    content_type, body = curl_form([form_part("file", b"abc", filename="f"), form_part("name", b"x")])
    with pytest.raises(MultipartError) as caught:
        extract_data(content_type, body)
    message = str(caught.value)
    assert "'data'" in message
    assert "'file'" in message and "'name'" in message


@pytest.mark.parametrize("body", [
    b"garbage",
    os.urandom(512),
    b"--" + BOUNDARY.encode() + b"--\r\n",
    b"\x00\xff" * 50 + b"--" + BOUNDARY.encode() + b"--",
    b"not a form at all --" + BOUNDARY.encode() + b"-- trailing",
], ids=["word", "random", "only-closing", "binary-then-closing", "text-around-closing"])
def test_garbage_is_refused_with_a_multipart_error(body):
    with pytest.raises(MultipartError):
        extract_data(f"multipart/form-data; boundary={BOUNDARY}", body)


boundaries = st.text(alphabet="0123456789abcdefABCDEF", min_size=16, max_size=24).map(lambda h: "-" * 24 + h)
filenames = st.none() | st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\'), min_size=1, max_size=20)
line_soup = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"--", b"-", b"x", b" ", b"\x00", b"\xff",
                                      b"Content-Type: text/plain\r\n", b"=?utf-8?q?x?="]), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048) | line_soup, boundary=boundaries, filename=filenames,
       other_first=st.booleans())
def test_any_bytes_survive_a_curl_style_envelope(data, boundary, filename, other_first):
    assume(boundary.encode() not in data)  # curl picks a random boundary; it is never in the file
    parts = [form_part("data", data, filename=filename)]
    if other_first:
        parts.insert(0, form_part("comment", b"hello", filename=None))
    content_type, body = curl_form(parts, boundary)
    assert extract_data(content_type, body) == data


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=512) | line_soup.map(lambda soup: soup + b"--" + BOUNDARY.encode() + b"--"))
def test_malformed_input_only_ever_raises_multipart_error(body):
    try:
        result = extract_data(f"multipart/form-data; boundary={BOUNDARY}", body)
    except MultipartError:
        return
    assert isinstance(result, bytes)
