"""JoinTokenBook and its file: one-time, expiring, hashed, persisted 0600."""

from __future__ import annotations

import os
import random

import pytest

from federation.jointoken import JoinTokenBook, JoinTokenError, JoinTokenFile, JoinTokenFileError
from tests.catalog_stream.harness import WORKLOAD_A, WORKLOAD_B


def test_redeem_once_then_used():
    book = JoinTokenBook()
    token = book.issue(WORKLOAD_A, ttl=60, now=100.0, rng=random.Random(1))
    assert book.check(token, 101.0) == WORKLOAD_A
    assert book.redeem(token, 101.0) == WORKLOAD_A
    with pytest.raises(JoinTokenError) as info:
        book.redeem(token, 102.0)
    assert info.value.reason == "used"


@pytest.mark.parametrize(
    ("mutate", "now", "reason"),
    [
        (lambda t: t, 160.0, "expired"),
        (lambda t: t[:-1] + ("B" if t[-1] != "B" else "C"), 101.0, "unknown"),
        (lambda t: "mfjt1.ffffffffffffffff." + t.split(".")[2], 101.0, "unknown"),
        (lambda t: t + "x", 101.0, "malformed"),
    ],
)
def test_refusals_name_the_reason(mutate, now, reason):
    book = JoinTokenBook()
    token = book.issue(WORKLOAD_A, ttl=60, now=100.0, rng=random.Random(1))
    with pytest.raises(JoinTokenError) as info:
        book.redeem(mutate(token), now)
    assert info.value.reason == reason


def test_issue_refuses_bad_ttl_and_ids_without_path():
    with pytest.raises(ValueError):
        JoinTokenBook().issue(WORKLOAD_A, ttl=0, now=0.0)
    with pytest.raises(ValueError):
        JoinTokenBook().issue(WORKLOAD_A.trust_domain.id, ttl=10, now=0.0)


def test_file_is_private_hashed_and_survives_restart(tmp_path):
    path = tmp_path / "tokens.json"
    tokens = JoinTokenFile(path)
    used = tokens.issue(WORKLOAD_A, ttl=600, now=0.0)
    unused = tokens.issue(WORKLOAD_B, ttl=600, now=0.0)
    tokens.redeem(used, now=1.0)
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    assert used.split(".")[2] not in text and unused.split(".")[2] not in text
    restarted = JoinTokenFile(path)
    assert restarted.redeem(unused, now=2.0) == WORKLOAD_B
    with pytest.raises(JoinTokenError) as info:
        restarted.redeem(used, now=2.0)
    assert info.value.reason == "used"


def test_a_loose_or_corrupt_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "tokens.json"
    JoinTokenFile(path).issue(WORKLOAD_A, ttl=600, now=0.0)
    os.chmod(path, 0o644)
    with pytest.raises(JoinTokenFileError, match="chmod 600"):
        JoinTokenFile(path)
    os.chmod(path, 0o600)
    path.write_text('{"schema": 1, "tokens": {"zz": {}}}')
    with pytest.raises(JoinTokenFileError, match="corrupt"):
        JoinTokenFile(path)


def test_agent_and_cli_sharing_the_file_never_lose_each_others_changes(tmp_path):
    # The running agent holds one JoinTokenFile, `meshfed agent token create` another.
    path = tmp_path / "tokens.json"
    agent = JoinTokenFile(path)
    first = agent.issue(WORKLOAD_A, ttl=600, now=0.0)
    cli = JoinTokenFile(path)
    second = cli.issue(WORKLOAD_B, ttl=600, now=1.0)  # issued after the agent loaded
    assert agent.redeem(second, now=2.0) == WORKLOAD_B  # the agent sees the CLI's token
    third = cli.issue(WORKLOAD_A, ttl=600, now=3.0)  # the CLI must not undo the burn
    restarted = JoinTokenFile(path)
    with pytest.raises(JoinTokenError) as info:
        restarted.redeem(second, now=4.0)
    assert info.value.reason == "used"
    assert restarted.redeem(first, now=4.0) == WORKLOAD_A
    assert restarted.redeem(third, now=4.0) == WORKLOAD_A
