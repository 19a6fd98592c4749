"""Migration URIs: every scheme QEMU accepts, and clear refusals."""

import pytest

from livemig.errors import UsageError
from livemig.transport import parse_uri


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("tcp:127.0.0.1:4444", {"scheme": "tcp", "host": "127.0.0.1", "port": 4444}),
        ("tcp:0:4444", {"host": "0.0.0.0", "port": 4444}),
        ("tcp:[::1]:5", {"host": "::1", "port": 5}),
        ("tcp::4444", {"host": "0.0.0.0"}),
        ("unix:/tmp/x.sock", {"scheme": "unix", "path": "/tmp/x.sock"}),
        ("fd:7", {"scheme": "fd", "fd": 7}),
        ("exec:gzip -c > /tmp/f", {"scheme": "exec", "command": "gzip -c > /tmp/f"}),
        ("file:/tmp/snap", {"scheme": "file", "path": "/tmp/snap", "offset": 0}),
        ("file:/tmp/snap,offset=4096", {"offset": 4096}),
    ],
)
def test_parse(text: str, fields: dict) -> None:
    uri = parse_uri(text)
    for key, value in fields.items():
        assert getattr(uri, key) == value
    assert parse_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "invalid migration URI"),
        ("http://x", "unknown scheme 'http'"),
        ("tcp:host", "tcp:HOST:PORT"),
        ("tcp:host:99999", "out of range"),
        ("unix:", "unix:PATH"),
        ("fd:abc", "fd:N"),
        ("exec:  ", "exec:COMMAND"),
        ("file:/x,size=3", "offset=N"),
    ],
)
def test_refused(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as info:
        parse_uri(text)
    assert repr(text) in str(info.value)


def test_return_path_capability() -> None:
    assert parse_uri("tcp:1.2.3.4:5").has_return_path
    assert not parse_uri("exec:cat").has_return_path
    assert not parse_uri("file:/x").has_return_path
