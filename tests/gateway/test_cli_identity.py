"""`meshfed gateway run` processes: the first SVID by join token from a real agent
stream server (in this test's process, on loopback), and a followed ``--catalog`` file.
Real sockets, so no MockClock; ``fail_after`` only guards against hangs."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from federation.agent.stream_server import serve_catalog_stream
from federation.jointoken import JoinTokenFile
from tests.catalog_stream.harness import (
    AGENT_TLS,
    CA,
    TD,
    FakeRegistrar,
    FakeSigner,
    FakeSource,
    local_endpoint,
)
from trust.spiffe import gateway_id

from .helpers import (
    bundle_doc,
    cas,
    catalog_with_bundles,
    cluster_record,
    gateway_svid,
    td,
    write_gateway_config,
)

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gateway_process(log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, "-m", "federation.cli.main", "gateway", "run", *args]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def get_stats(port: int) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, trio.BrokenResourceError):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " in head.split(b"\r\n")[0] + b" ":
            out: dict[str, Any] = json.loads(body)
            return out
    return None


async def wait_stats(
    port: int, proc: subprocess.Popen[bytes], log: Path, predicate: Any
) -> dict[str, Any]:
    with trio.fail_after(30):
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            stats = await get_stats(port)
            if stats is not None and predicate(stats):
                return stats
            await trio.sleep(0.1)


async def test_join_token_bootstraps_the_gateway_svid_from_its_agent(tmp_path: Path) -> None:
    cfg_path = tmp_path / "fed.yaml"
    write_gateway_config(cfg_path, {"c1": HOST}, {"c1": TD.name})
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / f"{TD.name}.json").write_text(CA.trust_bundle(1).to_json())
    tokens = JoinTokenFile(tmp_path / "agent" / "join-tokens.json")
    (tmp_path / "agent").mkdir()
    me = gateway_id(TD)
    token = tokens.issue(me, 600, time.time())
    source = FakeSource()
    source.reset(local_endpoint("e1"))
    signer = FakeSigner()
    admin = free_port()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_catalog_stream, join_tokens=tokens)
        server = await nursery.start(serve, source, FakeRegistrar(), signer, AGENT_TLS, HOST, 0)
        common = [
            "--config", str(cfg_path), "--cluster", "c1", "--bundles", str(bundles),
            "--agent", f"{HOST}:{server.port}", "--passthrough-port", str(free_port()),
            "--tunnel-port", str(free_port()), "--admin-port", str(admin),
        ]  # fmt: skip
        log = tmp_path / "gw.log"
        first = [*common, "--state-dir", str(tmp_path / "s1"), "--join-token", token]
        with gateway_process(log, *first) as proc:
            stats = await wait_stats(admin, proc, log, lambda s: s["ready"])
            assert stats["svid"] == str(me)
            assert stats["svid_renewal"] == {
                "renewals": 0,
                "failures": 0,
                "consecutive_failures": 0,
                "next_attempt_at": stats["svid_renewal"]["next_attempt_at"],
                "last_error": None,
            }
            assert stats["svid_renewal"]["next_attempt_at"] is not None
            assert signer.signed == [me]
        # The token is burned: a second start with it exits 3 and says what to do.
        log2 = tmp_path / "gw2.log"
        again = [*common, "--state-dir", str(tmp_path / "s2"), "--join-token", token]
        with gateway_process(log2, *again) as proc2:
            code = await trio.to_thread.run_sync(proc2.wait, 30)
        assert code == 3
        assert "token_used" in log2.read_text() and "meshfed agent token" in log2.read_text()
        assert signer.signed == [me]
        nursery.cancel_scope.cancel()


async def test_static_catalog_file_is_followed_and_its_bundles_applied(tmp_path: Path) -> None:
    cfg_path = tmp_path / "fed.yaml"
    write_gateway_config(cfg_path, {"a": HOST, "b": HOST})
    authorities = cas("a", "b")
    svid_dir = tmp_path / "svid"
    svid_dir.mkdir()
    svid = gateway_svid(authorities["a"])
    (svid_dir / "svid.crt").write_bytes(svid.chain_pem())
    (svid_dir / "svid.key").write_bytes(svid.key_pem())
    (svid_dir / "svid.key").chmod(0o600)
    records = [cluster_record("a", HOST), cluster_record("b", HOST)]
    docs = {td(c): bundle_doc((ca,), 1) for c, ca in authorities.items()}
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_bytes(catalog_with_bundles("a", records, docs).to_json())
    admin = free_port()
    log = tmp_path / "gw.log"
    args = [
        "--config", str(cfg_path), "--cluster", "a", "--state-dir", str(tmp_path / "s"),
        "--svid-dir", str(svid_dir), "--catalog", str(catalog_file),
        "--passthrough-port", str(free_port()), "--tunnel-port", str(free_port()),
        "--admin-port", str(admin),
    ]  # fmt: skip
    with gateway_process(log, *args) as proc:
        # No bundles/ in the SVID dir: the static catalog's bundles seed the anchors.
        stats = await wait_stats(admin, proc, log, lambda s: s["ready"])
        assert stats["catalog_version"] == ["e1", 1]
        assert stats["trust_domains"] == [td("a"), td("b")]
        assert stats["svid_renewal"] is None
        # A new cluster joins: its bundle arrives in the rewritten file, no restart.
        new = cas("c")["c"]
        docs2 = {**docs, td("c"): bundle_doc((new,), 1)}
        records2 = [*records, cluster_record("c", HOST)]
        catalog_file.write_bytes(catalog_with_bundles("a", records2, docs2, version=2).to_json())
        stats = await wait_stats(admin, proc, log, lambda s: s["catalog_version"] == ["e1", 2])
        assert stats["trust_domains"] == [td("a"), td("b"), td("c")]
        assert stats["svid_generation"] == 2
