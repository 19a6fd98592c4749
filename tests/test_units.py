"""Sizes as users type them."""

import pytest

from livemig.errors import UsageError
from livemig.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1.5K", 1536),
        ("2MiB", 2 << 20),
        ("8k", 8192),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1X", "-4", "1.3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(1536 * 1024 * 1024) == "1.5 GiB"
