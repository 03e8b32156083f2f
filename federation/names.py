"""Names that end up inside store keys, SNI labels and SPIFFE paths.

Two levels of strictness:

* ``check_key_segment`` is the store's last line of defence: a segment may not
  contain ``/``, be ``.``/``..``, be empty, contain control characters or
  whitespace, or exceed ``MAX_SEGMENT_LEN`` bytes. Anything that passes cannot
  escape the key it is placed in.
* ``check_dns_label`` is what the deployment config and the APIs require for
  cluster, namespace and service names: an RFC 1123 label (lower-case
  alphanumerics and ``-``, 1-63 characters, alphanumeric at both ends). Such a
  name is also valid inside an SNI host name and a SPIFFE path segment.
"""

from __future__ import annotations

import re

MAX_SEGMENT_LEN = 253
MAX_LABEL_LEN = 63

_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class InvalidName(ValueError):
    """A name that would escape its key or is not a valid mesh name.

    ``reason`` is a short phrase saying which rule was broken; ``hint`` says how to fix it.
    """

    def __init__(self, what: str, value: str, reason: str, hint: str = "") -> None:
        self.what = what
        self.value = value
        self.reason = reason
        self.hint = hint
        msg = f"invalid {what} {value!r}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


def check_key_segment(value: str, what: str = "key segment") -> str:
    """Return ``value`` if it is safe as one segment of a store key, else raise InvalidName."""
    if not isinstance(value, str):
        raise InvalidName(what, repr(value), "must be a string")
    if value == "":
        raise InvalidName(what, value, "must not be empty")
    if value in (".", ".."):
        raise InvalidName(what, value, "must not be a dot segment")
    if "/" in value:
        raise InvalidName(what, value, "must not contain '/'", "one name per key segment")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise InvalidName(what, value, "must not contain whitespace or control characters")
    if len(value.encode("utf-8")) > MAX_SEGMENT_LEN:
        raise InvalidName(what, value[:40] + "...", f"longer than {MAX_SEGMENT_LEN} bytes")
    return value


def check_dns_label(value: str, what: str = "name") -> str:
    """Return ``value`` if it is an RFC 1123 label (and so a safe key segment), else raise."""
    check_key_segment(value, what)
    if len(value) > MAX_LABEL_LEN:
        raise InvalidName(what, value, f"longer than {MAX_LABEL_LEN} characters")
    if not _LABEL_RE.match(value):
        raise InvalidName(
            what,
            value,
            "not an RFC 1123 label",
            "use lower-case letters, digits and '-', starting and ending with a letter or digit",
        )
    return value
