import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.config.durations import (
    MAX_DURATION_MS,
    InvalidDuration,
    format_duration,
    parse_duration,
    parse_duration_ms,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("150ms", 0.15),
        ("2s", 2.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("0s", 0.0),
        ("1h2m3s4ms", 3723.004),
        ("90s", 90.0),
    ],
)
def test_valid_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10", "has no unit"),
        ("2 secs", "contains spaces"),
        ("-1s", "negative"),
        ("", "empty"),
        ("1.5s", "fraction"),
        ("30s1m", "malformed"),
        ("1d", "malformed"),
        ("5S", "malformed"),
        ("1m1m", "malformed"),
        ("s", "malformed"),
        ("100000000h", "longer than ten years"),
    ],
)
def test_invalid_durations_are_refused_with_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidDuration, match=reason):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=MAX_DURATION_MS))
def test_format_then_parse_round_trips_every_millisecond_count(ms: int) -> None:
    assert parse_duration_ms(format_duration(ms / 1000)) == ms


@given(
    st.tuples(
        st.one_of(st.none(), st.integers(0, 500)),
        st.one_of(st.none(), st.integers(0, 500)),
        st.one_of(st.none(), st.integers(0, 500)),
        st.one_of(st.none(), st.integers(0, 5000)),
    ).filter(lambda parts: any(p is not None for p in parts))
)
def test_any_grammatical_string_parses_and_its_canonical_form_is_stable(
    parts: tuple[int | None, ...],
) -> None:
    text = "".join(
        f"{amount}{unit}"
        for amount, unit in zip(parts, ("h", "m", "s", "ms"), strict=True)
        if amount is not None
    )
    ms = parse_duration_ms(text)
    canonical = format_duration(ms / 1000)
    assert parse_duration_ms(canonical) == ms
    assert format_duration(parse_duration(canonical)) == canonical


def test_format_refuses_negative_durations() -> None:
    with pytest.raises(ValueError, match="never negative"):
        format_duration(-0.5)
