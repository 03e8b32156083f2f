"""Network namespaces: the probe answers with a reason; the helper cuts and restores a link."""

from __future__ import annotations

import os

import pytest

from chaos.netns import NetnsLink, netns_supported


def test_probe_answers_with_a_reason():
    ok, reason = netns_supported()
    assert isinstance(ok, bool) and reason
    if os.geteuid() != 0:
        assert not ok and "root" in reason


def test_link_can_be_cut_and_restored():
    ok, reason = netns_supported()
    if not ok:
        pytest.skip(reason)
    link = NetnsLink(f"mfa{os.getpid()}", f"mfb{os.getpid()}").create()
    try:
        assert link.is_up()
        link.cut()
        assert not link.is_up()
        link.restore()
        assert link.is_up()
    finally:
        link.delete()
