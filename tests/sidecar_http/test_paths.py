"""Path normalisation: table cases, refusals, and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http.paths import BadPath, PathTooLong, SlashAction, normalize_path

NORMALISED = [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("//a///b", "/a/b"),
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/../../a", "/a"),  # clamped at the root
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/a/", "/a/"),
    ("/%61dmin", "/admin"),
    ("/%2e%2e/admin", "/admin"),
    ("/x/%2E%2E/admin", "/admin"),
    ("/a%7eb", "/a~b"),
    ("/a%3fb", "/a%3Fb"),  # reserved stays encoded, hex upper-cased
    ("/a%25b", "/a%25b"),
    ("/a%252Fb", "/a%252Fb"),  # double encoding is not decoded twice
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalises_known_spellings(raw: str, expected: str) -> None:
    assert normalize_path(raw).path == expected


def test_query_is_kept_untouched_and_separate() -> None:
    p = normalize_path("/a/../b?x=%2F..//&y")
    assert (p.path, p.query, p.target) == ("/b", "x=%2F..//&y", "/b?x=%2F..//&y")
    assert normalize_path("/b?").query == ""
    assert normalize_path("/b").query is None


REFUSED = [
    ("/a%2Fb", "escaped_slash"),
    ("/a%2fb", "escaped_slash"),
    ("/a%5Cb", "escaped_slash"),
    ("/a\\b", "backslash"),
    ("/a%00b", "control_character"),
    ("/a%0Ab", "control_character"),
    ("/a%7fb", "control_character"),
    ("/a\x00b", "control_character"),
    ("/a b", "control_character"),
    ("/a%zzb", "bad_escape"),
    ("/a%4", "bad_escape"),
    ("/a#frag", "fragment"),
    ("a/b", "not_origin_form"),
    ("*", "not_origin_form"),
    ("/caf\u00e9", "non_ascii"),
]


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_refuses_unsafe_paths_with_400(raw: str, reason: str) -> None:
    with pytest.raises(BadPath) as info:
        normalize_path(raw)
    assert (info.value.reason, info.value.status) == (reason, 400)


def test_non_ascii_bytes_refused() -> None:
    with pytest.raises(BadPath) as info:
        normalize_path(b"/caf\xc3\xa9")
    assert info.value.reason == "non_ascii"


def test_overlong_target_is_414() -> None:
    with pytest.raises(PathTooLong) as info:
        normalize_path("/" + "a" * 9000)
    assert info.value.status == 414


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a%2Fb", "/a/b"),
        ("/a%5c..%5cadmin", "/admin"),
        ("/a\\b", "/a/b"),
        ("/x/..%2F..%2Fy", "/y"),
    ],
)
def test_decode_action_turns_escaped_slashes_into_separators(raw: str, expected: str) -> None:
    assert normalize_path(raw, SlashAction.DECODE).path == expected


# -- properties ----------------------------------------------------------------------------

_segment_chars = st.sampled_from(
    ["a", "b", "Z", "0", "-", "_", "~", ".", "..", "%2e", "%2E", "%41", "%3F", "%25", "", ";", "@"]
)
_paths = st.lists(st.lists(_segment_chars, max_size=4).map("".join), max_size=8).map(
    lambda segs: "/" + "/".join(segs)
)


@given(_paths, st.sampled_from(list(SlashAction)))
def test_normalisation_is_idempotent(raw: str, action: SlashAction) -> None:
    once = normalize_path(raw, action)
    assert normalize_path(once.path, action).path == once.path


@given(_paths, st.sampled_from(list(SlashAction)))
def test_output_has_no_empty_or_dot_segments(raw: str, action: SlashAction) -> None:
    path = normalize_path(raw, action).path
    assert path.startswith("/")
    assert "//" not in path
    assert "/./" not in path and "/../" not in path
    assert not path.endswith(("/.", "/.."))


def _encodings(ch: str) -> list[str]:
    return [ch, f"%{ord(ch):02x}", f"%{ord(ch):02X}"]


@st.composite
def _admin_spellings(draw: st.DrawFn) -> str:
    """``/admin`` spelled with random escapes, extra slashes and dot detours."""
    name = "".join(draw(st.sampled_from(_encodings(c))) for c in "admin")
    lead = draw(st.sampled_from(["/", "//", "/./", "/x/../", "/%2e/", "/x/%2e%2e/", "/../"]))
    tail = draw(st.sampled_from(["", "/", "/sub", "/./sub", "//sub"]))
    return lead + name + tail


@given(_admin_spellings())
def test_no_spelling_of_admin_escapes_an_admin_prefix_rule(raw: str) -> None:
    path = normalize_path(raw).path
    assert path == "/admin" or path.startswith("/admin/")


@given(_admin_spellings(), st.sampled_from(["%2F", "%2f", "%5C", "%5c", "\\"]))
def test_escaped_separators_around_admin_are_refused(raw: str, sep: str) -> None:
    with pytest.raises(BadPath):
        normalize_path("/x/.." + sep + raw.lstrip("/"))
