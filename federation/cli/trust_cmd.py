"""``meshfed trust``: the per-cluster CA, SVIDs, bundles, rotation, revocation, checks.

Exit codes (docs/cli.md): 0 success; 1 a check failed or a step must wait
(e.g. ``rotate --step drop`` while old SVIDs may be live); 2 invalid input
(bad ID, duration, file, a key readable by others, a refused bundle, a step out
of order); 3 the store is unavailable. Every error is one line on stderr naming
the file or value and the fix.

``--now`` (hidden) pins the clock to an ISO time, for drills and tests; by
default the system clock is used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import trio
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from federation.config.durations import InvalidDuration, parse_duration
from federation.config.errors import ConfigError
from federation.config.loader import load_config
from federation.store.api import Store, StoreError, StoreUnavailable
from federation.store.open import InvalidStoreURL, open_store
from trust.atomicfile import write_atomic
from trust.bundle import BundleKeeper, Refused, TrustBundle
from trust.errors import BundleError, CaKeyError, InvalidSpiffeId, TrustError
from trust.publish import PublishRefused, publish_bundle, publish_revocation, read_bundles
from trust.revocation import Revocation
from trust.rotation import CaDirectory, RotationRefused, RotationStep
from trust.spiffe import SpiffeId, TrustDomain

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
EXPIRY_WARNING = dt.timedelta(days=30)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bundle_app = typer.Typer(no_args_is_help=True, add_completion=False)
app.add_typer(bundle_app, name="bundle", help="Export and import SPIFFE trust bundles.")

T = TypeVar("T")

DirOpt = Annotated[Path, typer.Option("--dir", help="The CA directory.")]
NowOpt = Annotated[str | None, typer.Option("--now", hidden=True, help="ISO time to use as now.")]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URL (etcd://host:port or memory://).")
]


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _now(value: str | None) -> dt.datetime:
    if value is None:
        return dt.datetime.now(dt.UTC)
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--now {value!r} is not an ISO time such as 2026-03-01T12:00:00+00:00")
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def fp(cert: x509.Certificate) -> str:
    """Short SHA-256 fingerprint shown to operators (first 16 hex digits)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()[:16]


def human(delta: dt.timedelta) -> str:
    """``1d3h``, ``59m12s``, ``12s``: how long, at a glance."""
    seconds = abs(int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def validity(cert: x509.Certificate, now: dt.datetime) -> tuple[str, bool]:
    """A readable validity line and whether the certificate is valid at ``now``."""
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    span = f"{nb:%Y-%m-%d %H:%M:%S}Z to {na:%Y-%m-%d %H:%M:%S}Z"
    if now < nb:
        return f"{span} (NOT YET VALID: starts in {human(nb - now)})", False
    if now > na:
        return f"{span} (EXPIRED {human(now - na)} ago)", False
    return f"{span} (expires in {human(na - now)})", True


def _open_ca(directory: Path) -> CaDirectory:
    try:
        return CaDirectory.open(directory)
    except (CaKeyError, RotationRefused) as exc:
        _fail(str(exc))


def _run_store(url: str, fn: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        async with open_store(url) as store:
            return await fn(store)

    try:
        return trio.run(main)
    except InvalidStoreURL as exc:
        _fail(str(exc))
    except StoreUnavailable as exc:
        _fail(f"store {url} unavailable: {exc}", EXIT_UNAVAILABLE)
    except StoreError as exc:
        _fail(f"store {url}: {exc}", EXIT_UNAVAILABLE)


def _publish(url: str, bundle: TrustBundle) -> None:
    try:
        result = _run_store(url, lambda store: publish_bundle(store, bundle))
    except PublishRefused as exc:
        _fail(f"{exc}; the store keeps its bundle")
    verb = "published" if result.written else "already published"
    typer.echo(
        f"{verb}: {bundle.trust_domain} sequence {bundle.sequence} to {url} "
        f"(mod_revision {result.mod_revision})"
    )


@app.command()
def init(
    directory: DirOpt,
    trust_domain: Annotated[
        str | None, typer.Option("--trust-domain", help="e.g. aws-use1.acme.mesh")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Deployment config to take it from.")
    ] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Cluster in --config.")] = None,
    intermediate: Annotated[
        bool, typer.Option("--intermediate", help="Sign with an intermediate under the root.")
    ] = False,
    now: NowOpt = None,
) -> None:
    """Create a cluster CA (keys 0600) and its rotation state in an empty directory."""
    if (trust_domain is None) == (config is None):
        _fail("give either --trust-domain or --config with --cluster")
    if config is not None:
        if cluster is None:
            _fail("--config needs --cluster to say whose trust domain to use")
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            _fail(f"{exc.issues[0]} (run `meshfed config validate {config}`)")
        except OSError as exc:
            _fail(f"{config}: {exc.strerror}")
        try:
            trust_domain = str(cfg.cluster(cluster).trust_domain)
        except KeyError:
            names = ", ".join(c.name for c in cfg.clusters)
            _fail(f"{config}: no cluster {cluster!r} (clusters: {names})")
    assert trust_domain is not None
    try:
        td = TrustDomain.parse(trust_domain)
    except InvalidSpiffeId as exc:
        _fail(f"--trust-domain: {exc}")
    try:
        ca_dir = CaDirectory.init(directory, td, _now(now), intermediate=intermediate)
        ca = ca_dir.active()
    except CaKeyError as exc:
        _fail(str(exc))
    line, _ = validity(ca.root, _now(now))
    typer.echo(f"created CA for {td} in {directory}")
    typer.echo(f"  root {fp(ca.root)}  {line}")
    if intermediate:
        typer.echo(f"  intermediate {fp(ca.certificate)} signs; root.key may be moved offline")
    typer.echo(
        f"  bundle sequence {ca_dir.state.sequence}; publish it with `meshfed trust "
        f"bundle export --dir {directory}`"
    )


def _write_private(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        _fail(f"{path} already exists; refusing to overwrite a key (choose another --out)")
    except OSError as exc:
        _fail(f"{path}: {exc.strerror}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@app.command()
def issue(
    directory: DirOpt,
    spiffe_id: Annotated[str, typer.Option("--spiffe-id", help="The workload's SPIFFE ID.")],
    out: Annotated[Path, typer.Option("--out", help="Writes OUT.crt (chain) and OUT.key (0600).")],
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime, e.g. 1h, 30m.")] = "1h",
    now: NowOpt = None,
) -> None:
    """Issue an X.509-SVID from the signing CA (recorded for the rotation's drop step)."""
    try:
        sid = SpiffeId.parse(spiffe_id)
    except InvalidSpiffeId as exc:
        _fail(f"--spiffe-id: {exc}")
    try:
        lifetime = dt.timedelta(seconds=parse_duration(ttl))
    except InvalidDuration as exc:
        _fail(f"--ttl: {exc}")
    ca_dir = _open_ca(directory)
    crt_path, key_path = Path(f"{out}.crt"), Path(f"{out}.key")
    if key_path.exists() or crt_path.exists():
        _fail(
            f"{key_path} or {crt_path} already exists; refusing to overwrite (choose another --out)"
        )
    try:
        svid = ca_dir.issue(sid, _now(now), lifetime)
    except CaKeyError as exc:
        _fail(str(exc))
    except TrustError as exc:
        _fail(f"{directory}: {exc}")
    _write_private(key_path, svid.key_pem())
    crt_path.write_bytes(svid.chain_pem())
    line, _ = validity(svid.leaf, _now(now))
    typer.echo(f"issued {sid}")
    typer.echo(f"  serial {svid.serial:x}")
    typer.echo(f"  valid  {line}")
    typer.echo(f"  wrote  {crt_path} and {key_path} (mode 0600)")


def _show_cert(i: int, total: int, cert: x509.Certificate, now: dt.datetime) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca, path_len = bc.ca, bc.path_length
    except x509.ExtensionNotFound:
        is_ca, path_len = False, None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    kind = f"CA (pathLen {path_len})" if is_ca else "leaf X.509-SVID"
    line, _ = validity(cert, now)
    typer.echo(f"certificate {i} of {total}: {kind}")
    typer.echo(f"  identity  {', '.join(uris) or '(no URI SAN)'}")
    typer.echo(f"  subject   {cert.subject.rfc4514_string()}")
    typer.echo(f"  issuer    {cert.issuer.rfc4514_string()}")
    typer.echo(f"  serial    {cert.serial_number:x}")
    typer.echo(f"  valid     {line}")
    typer.echo(f"  sha256    {cert.fingerprint(hashes.SHA256()).hex()}")


def _show_ca_dir(directory: Path, now: dt.datetime) -> None:
    ca_dir = _open_ca(directory)
    state = ca_dir.state
    try:
        td = ca_dir.trust_domain
        roots = ca_dir.bundle_roots()
    except CaKeyError as exc:
        _fail(str(exc))
    typer.echo(f"CA directory {directory}: trust domain {td}")
    typer.echo(f"  rotation  phase {state.phase}, next step {state.next_step!r}")
    typer.echo(f"  bundle    sequence {state.sequence}, {len(roots)} root(s)")
    for root in roots:
        line, _ = validity(root, now)
        typer.echo(f"    root {fp(root)}  {line}")
    if state.active_issued_until is not None:
        typer.echo(f"  signing CA's SVIDs valid until {state.active_issued_until.isoformat()}")
    if state.previous_issued_until is not None:
        until = state.previous_issued_until
        when = "now" if now >= until else f"in {human(until - now)}"
        typer.echo(f"  old CA's SVIDs valid until {until.isoformat()}: drop allowed {when}")


@app.command()
def show(
    path: Annotated[Path, typer.Argument(help="A certificate (PEM) file or a CA directory.")],
    now: NowOpt = None,
) -> None:
    """Print identity, issuer, serial, validity and time left; for a CA dir, roots and rotation."""
    at = _now(now)
    if path.is_dir():
        _show_ca_dir(path, at)
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        _fail(f"{path}: {exc.strerror}")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        _fail(f"{path}: no PEM certificates (show takes a certificate file or a CA directory)")
    for i, cert in enumerate(certs, 1):
        _show_cert(i, len(certs), cert, at)


@bundle_app.command("export")
def bundle_export(
    directory: DirOpt,
    sequence: Annotated[
        int | None, typer.Option("--sequence", min=0, help="Override spiffe_sequence.")
    ] = None,
) -> None:
    """Print this CA's SPIFFE bundle JSON (both roots during a rotation)."""
    ca_dir = _open_ca(directory)
    try:
        typer.echo(ca_dir.bundle(sequence).to_json())
    except (CaKeyError, BundleError) as exc:
        _fail(str(exc))


def _domain(value: str, option: str) -> TrustDomain:
    try:
        return TrustDomain.parse(value)
    except InvalidSpiffeId as exc:
        _fail(f"{option}: {exc}")


@bundle_app.command("import")
def bundle_import(
    file: Annotated[Path, typer.Argument(help="SPIFFE bundle JSON to import.")],
    trust_domain: Annotated[str, typer.Option("--trust-domain", help="Domain it anchors.")],
    into: Annotated[Path, typer.Option("--into", help="Directory of <td>.json bundles.")],
) -> None:
    """Validate a bundle (rollback, conflicts, foreign roots) and store it as INTO/<td>.json."""
    td = _domain(trust_domain, "--trust-domain")
    try:
        text = file.read_bytes()
    except OSError as exc:
        _fail(f"{file}: {exc.strerror}")
    keeper = BundleKeeper()
    target = into / f"{td.name}.json"
    if into.is_dir():
        for held in sorted(into.glob("*.json")):
            if held == target:
                continue
            try:
                keeper.offer_json(TrustDomain.parse(held.stem), held.read_bytes())
            except InvalidSpiffeId:
                continue  # not a bundle file of ours
    if target.exists():
        current = keeper.offer_json(td, target.read_bytes())
        if isinstance(current, Refused):
            typer.echo(
                f"warning: {target} itself is invalid ({current.detail}); replacing it", err=True
            )
    outcome = keeper.offer_json(td, text)
    if isinstance(outcome, Refused):
        held_now = keeper.current(td)
        kept = f"; keeping {target} (sequence {held_now.sequence})" if held_now else ""
        _fail(f"{file}: refused ({outcome.reason}): {outcome.detail}{kept}")
    if not outcome.changed:
        typer.echo(f"unchanged: {target} already holds sequence {outcome.bundle.sequence}")
        return
    into.mkdir(parents=True, exist_ok=True)
    write_atomic(target, outcome.bundle.to_json().encode(), mode=0o644)
    typer.echo(
        f"imported {td} sequence {outcome.bundle.sequence} "
        f"({len(outcome.bundle.roots)} root(s)) into {target}"
    )


_STEP_ADVICE = {
    "publish": "distribute the bundle to every cluster, then run `--step switch`",
    "switch": "renew every SVID, wait until the old ones expire, then run `--step drop`",
    "drop": "distribute the bundle; the rotation is complete",
}


@app.command()
def rotate(
    directory: DirOpt,
    step: Annotated[str, typer.Option("--step", help="publish | switch | drop")],
    store: StoreOpt = None,
    now: NowOpt = None,
) -> None:
    """Rotate the CA in three steps: publish both roots, switch signer, drop the old root."""
    if step not in ("publish", "switch", "drop"):
        _fail(f"--step {step!r}: use publish, switch or drop (in that order)")
    ca_dir = _open_ca(directory)
    at = _now(now)
    if step == "switch" and store is not None:
        _check_propagated(ca_dir, store)
    step_t: RotationStep = step  # type: ignore[assignment]
    try:
        bundle = ca_dir.rotate(step_t, at)
    except RotationRefused as exc:
        _fail(str(exc), EXIT_INVALID if exc.reason == "out_of_order" else EXIT_FAILED)
    except CaKeyError as exc:
        _fail(str(exc))
    roots = ", ".join(fp(r) for r in bundle.roots)
    typer.echo(
        f"step {step} done: phase {ca_dir.state.phase}, bundle sequence {bundle.sequence} "
        f"with root(s) {roots}"
    )
    if store is not None:
        _publish(store, bundle)
    else:
        typer.echo(f"  publish it: meshfed trust bundle export --dir {directory}")
    typer.echo(f"  next: {_STEP_ADVICE[step]}")


def _check_propagated(ca_dir: CaDirectory, url: str) -> None:
    """Before switching, the store must already serve the combined bundle (step 1)."""
    expected = ca_dir.bundle()
    found, _ = _run_store(url, read_bundles)
    kv = found.get(expected.trust_domain)
    if kv is None:
        _fail(
            f"{url} has no bundle for {expected.trust_domain}; run `--step publish` with "
            f"--store first",
            EXIT_FAILED,
        )
    try:
        stored = TrustBundle.from_json(expected.trust_domain, kv.value)
    except BundleError as exc:
        _fail(f"{url}: bundle for {expected.trust_domain} is malformed ({exc.detail})", EXIT_FAILED)
    if stored.content_digest() != expected.content_digest():
        _fail(
            f"{url} serves sequence {stored.sequence} for {expected.trust_domain}, not the "
            f"combined bundle (sequence {expected.sequence}); publish it before switching",
            EXIT_FAILED,
        )


@app.command()
def revoke(
    directory: DirOpt,
    serial: Annotated[str | None, typer.Option("--serial", help="Certificate serial, hex.")] = None,
    spiffe_id: Annotated[
        str | None, typer.Option("--spiffe-id", help="Revoke every SVID of this ID.")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (for audit).")] = "",
    store: StoreOpt = None,
    now: NowOpt = None,
) -> None:
    """Revoke a certificate serial or a SPIFFE ID of this CA's domain (published with --store)."""
    if (serial is None) == (spiffe_id is None):
        _fail("give exactly one of --serial HEX or --spiffe-id ID")
    ca_dir = _open_ca(directory)
    try:
        td = ca_dir.trust_domain
    except CaKeyError as exc:
        _fail(str(exc))
    number: int | None = None
    sid: SpiffeId | None = None
    if serial is not None:
        text = serial.lower().removeprefix("0x").replace(":", "")
        try:
            number = int(text, 16)
        except ValueError:
            _fail(f"--serial {serial!r} is not hexadecimal (as printed by `meshfed trust show`)")
    else:
        assert spiffe_id is not None
        try:
            sid = SpiffeId.parse(spiffe_id)
        except InvalidSpiffeId as exc:
            _fail(f"--spiffe-id: {exc}")
    try:
        record = Revocation(td, number, sid, reason, _now(now))
    except TrustError as exc:
        _fail(str(exc))
    if store is None:
        typer.echo(record.to_json())
        typer.echo(
            f"not published (no --store): key /meshfed/v1/revocations/{td}/"
            f"{record.store_segment()}",
            err=True,
        )
        return
    key = _run_store(store, lambda s: publish_revocation(s, record))
    what = f"serial {number:x}" if number is not None else str(sid)
    typer.echo(f"revoked {what} in {td}: {key}")


@app.command()
def check(
    store: Annotated[str, typer.Option("--store", help="Store URL.")],
    directories: Annotated[
        list[Path] | None,
        typer.Option("--dir", help="A cluster's CA directory to compare with (repeatable)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Deployment config: every domain must publish.")
    ] = None,
    now: NowOpt = None,
) -> None:
    """Compare the store's bundles with each CA directory; exit 1 on any mismatch."""
    at = _now(now)
    problems: list[str] = []
    wanted: set[TrustDomain] = set()
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            _fail(f"{exc.issues[0]} (run `meshfed config validate {config}`)")
        except OSError as exc:
            _fail(f"{config}: {exc.strerror}")
        wanted = {TrustDomain.parse(str(c.trust_domain)) for c in cfg.clusters}
    found, strays = _run_store(store, read_bundles)
    for key in strays:
        problems.append(f"{key}: not a bundle key for a valid trust domain")
    keeper = BundleKeeper()
    parsed: dict[TrustDomain, TrustBundle] = {}
    for td in sorted(found, key=lambda t: t.name):
        try:
            parsed[td] = TrustBundle.from_json(td, found[td].value)
        except BundleError as exc:
            problems.append(f"{td}: published bundle is malformed ({exc.detail})")
            typer.echo(f"{td}: MALFORMED")
    for td, bundle in sorted(parsed.items(), key=lambda i: i[0].name):
        outcome = keeper.offer(bundle)
        note = " (rotation in progress)" if len(bundle.roots) > 1 else ""
        typer.echo(f"{td}: sequence {bundle.sequence}, {len(bundle.roots)} root(s){note}")
        if isinstance(outcome, Refused):
            problems.append(
                f"{td}: readers refuse this bundle ({outcome.reason}: {outcome.detail})"
            )
        for root in bundle.roots:
            line, ok = validity(root, at)
            typer.echo(f"  root {fp(root)}  {line}")
            if not ok:
                problems.append(f"{td}: root {fp(root)} is not valid now")
            elif root.not_valid_after_utc - at < EXPIRY_WARNING:
                typer.echo(f"  warning: root {fp(root)} expires in under 30 days; rotate the CA")
    for directory in directories or []:
        _compare_dir(directory, parsed, problems)
        with contextlib.suppress(CaKeyError, RotationRefused):  # reported by _compare_dir
            wanted.add(CaDirectory.open(directory).trust_domain)
    for td in sorted(wanted - found.keys(), key=lambda t: t.name):
        problems.append(f"{td}: no bundle published in the store")
    for problem in problems:
        typer.echo(f"PROBLEM {problem}")
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {store}", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"OK: {len(parsed)} trust domain(s) in {store}, no problems")


def _compare_dir(
    directory: Path, parsed: dict[TrustDomain, TrustBundle], problems: list[str]
) -> None:
    try:
        ca_dir = CaDirectory.open(directory)
        expected = ca_dir.bundle()
    except (CaKeyError, RotationRefused, BundleError) as exc:
        problems.append(f"{directory}: cannot read the CA directory ({exc})")
        return
    td = expected.trust_domain
    stored = parsed.get(td)
    if stored is None:
        return  # reported as "no bundle published" by the caller
    where = f"{td}: store vs {directory} (phase {ca_dir.state.phase})"
    if stored.sequence < expected.sequence:
        problems.append(
            f"{where}: store has sequence {stored.sequence}, the CA dir "
            f"{expected.sequence}; publish the CA dir's bundle"
        )
    elif stored.sequence > expected.sequence:
        problems.append(
            f"{where}: store is ahead (sequence {stored.sequence} > "
            f"{expected.sequence}); another publisher, or a restored CA dir"
        )
    elif stored.content_digest() != expected.content_digest():
        problems.append(f"{where}: same sequence {stored.sequence} but different roots")
    else:
        typer.echo(f"{td}: matches {directory}")
