"""Trust benchmark: SVID issuance rate, validation time, in-memory mTLS handshake rate.

    .venv/bin/python bench/trust_bench.py [--quick] [--out bench/results/trust.md]

* issuance: CSR (pre-generated P-256 key) -> ``CertificateAuthority.sign_csr``,
  which builds the leaf and runs ``verify_peer`` on it before returning;
* validation: ``verify_peer`` on a leaf signed directly by the root, and on a
  leaf + intermediate chain, with one trust domain of many in the bundle set;
* handshakes: mutual TLS 1.3 over ``trio.testing.memory_stream_pair`` with
  ``handshake_and_verify`` on both sides (no sockets: crypto + Python only),
  sequential, then 8 concurrent.

Each figure is the median of several rounds (these machines are noisy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cryptography
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trust.ca import CertificateAuthority  # noqa: E402
from trust.spiffe import TrustDomain, workload_id  # noqa: E402
from trust.svid import issue_svid, make_csr  # noqa: E402
from trust.tls import client_context, handshake_and_verify, server_context  # noqa: E402
from trust.validate import TrustBundleSet, verify_peer  # noqa: E402


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _rounds(fn: Callable[[], float], rounds: int) -> list[float]:
    return [fn() for _ in range(rounds)]


def bench_issuance(n: int, rounds: int) -> float:
    now = _now()
    ca, _ = CertificateAuthority.create(TrustDomain("bench.mesh"), now)
    sid = workload_id(ca.trust_domain, "bench", "svc")
    csrs = [make_csr(ec.generate_private_key(ec.SECP256R1()), sid) for _ in range(n)]

    def one_round() -> float:
        start = time.perf_counter()
        for csr in csrs:
            ca.sign_csr(csr, sid, now)
        return n / (time.perf_counter() - start)

    return statistics.median(_rounds(one_round, rounds))


def bench_validation(n: int, rounds: int, intermediate: bool) -> float:
    now = _now()
    domains = {}
    for i in range(20):  # a federation of 20 domains: lookup is by domain, not a scan
        c, _ = CertificateAuthority.create(TrustDomain(f"d{i}.mesh"), now)
        domains[c.trust_domain] = (c.root,)
    ca, _ = CertificateAuthority.create(TrustDomain("bench.mesh"), now, intermediate=intermediate)
    domains[ca.trust_domain] = (ca.root,)
    bundles = TrustBundleSet(domains)
    chain = issue_svid(ca, workload_id(ca.trust_domain, "bench", "svc"), now).chain_der()

    def one_round() -> float:
        start = time.perf_counter()
        for _ in range(n):
            verify_peer(chain, bundles, now)
        return (time.perf_counter() - start) / n * 1e6

    return statistics.median(_rounds(one_round, rounds))


def bench_handshakes(n: int, rounds: int, concurrency: int) -> float:
    now = _now()
    ca, _ = CertificateAuthority.create(TrustDomain("bench.mesh"), now)
    bundles = ca.bundle_set
    srv_ctx = server_context(issue_svid(ca, workload_id(ca.trust_domain, "a", "s"), now), bundles)
    cli_ctx = client_context(issue_svid(ca, workload_id(ca.trust_domain, "b", "c"), now), bundles)

    async def one() -> None:
        a, b = trio.testing.memory_stream_pair()
        srv = trio.SSLStream(a, srv_ctx, server_side=True)
        cli = trio.SSLStream(b, cli_ctx, server_hostname="svc")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake_and_verify, srv, bundles, _now)
            nursery.start_soon(handshake_and_verify, cli, bundles, _now)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async def one_round() -> float:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, n // concurrency)
        return (n // concurrency * concurrency) / (time.perf_counter() - start)

    async def main() -> list[float]:
        return [await one_round() for _ in range(rounds)]

    return statistics.median(trio.run(main))


def machine_facts() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- nproc: {os.cpu_count()}",
        f"- CPU: {cpu}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- python: {platform.python_version()} ({platform.python_implementation()})",
        f"- cryptography: {cryptography.__version__}; "
        f"its OpenSSL: {_crypto_openssl()}; ssl module: {ssl.OPENSSL_VERSION}",
        f"- trio: {trio.__version__}",
    ]


def _crypto_openssl() -> str:
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/trust.md")
    args = parser.parse_args()
    scale, rounds = (0.1, 3) if args.quick else (1.0, 5)
    n_issue, n_valid, n_hs = int(500 * scale), int(3000 * scale), int(400 * scale)

    issuance = bench_issuance(n_issue, rounds)
    valid_root = bench_validation(n_valid, rounds, intermediate=False)
    valid_inter = bench_validation(n_valid, rounds, intermediate=True)
    hs_seq = bench_handshakes(n_hs, rounds, 1)
    hs_conc = bench_handshakes(n_hs, rounds, 8)

    command = "  ".join(["cd", str(ROOT), "&&", ".venv/bin/python", "bench/trust_bench.py",
                         *(["--quick"] if args.quick else [])])
    lines = [
        "# Trust benchmark",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with:",
        "",
        "```",
        command.replace("  ", " "),
        "```",
        "",
        "## Machine",
        "",
        *machine_facts(),
        "",
        f"## Results (median of {rounds} rounds)",
        "",
        "| what | figure | per round |",
        "| --- | --- | --- |",
        f"| SVID issuance (CSR -> signed + self-validated leaf) | {issuance:,.0f} certs/s "
        f"| {n_issue} CSRs |",
        f"| `verify_peer`, leaf <- root, 21 domains in the set | {valid_root:,.0f} µs/call "
        f"| {n_valid} calls |",
        f"| `verify_peer`, leaf <- intermediate <- root | {valid_inter:,.0f} µs/call "
        f"| {n_valid} calls |",
        f"| mutual TLS 1.3 handshakes + SPIFFE check, memory streams, sequential "
        f"| {hs_seq:,.0f} /s | {n_hs} handshakes |",
        f"| same, 8 concurrent tasks (one trio thread) | {hs_conc:,.0f} /s | {n_hs} handshakes |",
        "",
        "Reading: a handshake here costs both sides' ECDHE + ECDSA work plus two",
        "`verify_peer` runs, all on one core; concurrency in one trio thread adds no",
        "CPU, so the two handshake rows are expected to be close. Issuance includes the",
        "CA's own `verify_peer` of every leaf before handing it out.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
