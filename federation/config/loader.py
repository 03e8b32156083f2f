"""Strict loading of a deployment config: YAML text -> FederationConfig, or every problem.

Steps, each collecting issues rather than stopping at the first:

1. compose the YAML into nodes (one document; syntax errors carry their line);
2. decode the nodes into the model, driven by its type hints (``decode.py``):
   unknown keys, duplicate keys, wrong types and bad values;
3. fill in derived defaults (network, trust domain, gateway bind, service account);
4. whole-config rules (``checks.py``): uniqueness, references, port collisions.

Only a config with no issue at all is returned; otherwise one ConfigError
carries them all, sorted by line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from federation.config.checks import SourceMap, check
from federation.config.decode import Decoder
from federation.config.errors import ConfigError, ConfigIssue
from federation.config.model import Cluster, FederationConfig, GatewaySpec, Workload
from federation.config.scalars import ServiceRef

#: Lists whose items are decoded independently, so one bad item does not hide the others.
PARTIAL_LISTS = (
    "clusters",
    "services",
    "workloads",
    "authorization.policies",
    "authorization.service_defaults",
)
#: Mappings where a bad optional value falls back to its default while checking continues.
LENIENT = ("", "federation", "federation.settings", "authorization")

#: Refuse absurd inputs before parsing them (YAML alias bombs, accidental binaries).
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def default_trust_domain(cluster: str, federation: str) -> str:
    """The trust domain of a cluster that does not set one: ``<cluster>.<federation>.mesh``."""
    return f"{cluster}.{federation}.mesh"


def load_config(path: str | os.PathLike[str]) -> FederationConfig:
    """Read and parse the config at ``path``; raise ConfigError listing every problem."""
    text, name = read_document(path)
    return parse_config(text, name)


def read_document(path: str | os.PathLike[str], *, what: str = "meshfed config") -> tuple[str, str]:
    """Read a YAML file for a strict loader: ``(text, name)``, or ConfigError if it cannot be
    read, is over 4 MiB or is not UTF-8. Shared with other strict formats (chaos drills)."""
    name = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    name,
                    0,
                    "",
                    f"cannot read the file: {exc.strerror or exc}",
                    "check the path and its permissions",
                )
            ]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [ConfigIssue(name, 0, "", "file is larger than 4 MiB", f"is this really a {what}?")]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigIssue(name, line, "", "file is not valid UTF-8", "save it as UTF-8")]
        ) from None
    return text, name


def compose_document(
    text: str,
    filename: str,
    *,
    noun: str = "config",
    holds: str = "one federation",
    docs: str = "docs/config.md",
) -> yaml.Node:
    """Compose ``text`` (exactly one non-empty YAML document) into nodes; raise ConfigError.

    Compose only: nodes keep their marks (lines), and nothing is constructed until the
    decoder has checked keys (including duplicates, which PyYAML would silently merge).
    The keyword arguments only word the messages, so other strict formats can reuse it.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 0
        problem = exc.problem or "malformed YAML"
        hint = exc.context or "fix the YAML syntax"
        if "single document" in f"{problem} {exc.context}":
            problem = "more than one YAML document"
            hint = f"one file holds {holds}; remove the extra '---' documents"
        raise ConfigError(
            [ConfigIssue(filename, line, "", f"malformed YAML: {problem}", hint)]
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            [
                ConfigIssue(
                    filename,
                    line,
                    "",
                    f"unreadable character {exc.character!r}",
                    "remove control characters from the file",
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(filename, 0, "", f"malformed YAML: {exc}")]) from None
    if root is None:
        raise ConfigError(
            [ConfigIssue(filename, 1, "", f"empty {noun}", f"see {docs} for the format")]
        )
    return root


def parse_config(text: str, filename: str = "<string>") -> FederationConfig:
    """Parse config ``text``; ``filename`` is only used in messages. Raise ConfigError."""
    root = compose_document(text, filename)
    decoder = Decoder(filename, partial=PARTIAL_LISTS, lenient=LENIENT)
    decoded = decoder.decode(root, FederationConfig, "")
    issues = list(decoder.issues)
    if isinstance(decoded, FederationConfig):
        config = resolve_defaults(decoded)
        source = SourceMap(
            kept=decoder.kept,
            dropped_clusters=frozenset(
                raw["name"] for raw in decoder.dropped.get("clusters", []) if "name" in raw
            ),
            dropped_services=frozenset(
                ServiceRef(raw["name"], raw["namespace"])
                for raw in decoder.dropped.get("services", [])
                if "name" in raw and "namespace" in raw
            ),
            incomplete=frozenset(decoder.dropped),
        )
        for found in check(config, source):
            line = _line_of(decoder.lines, found.path)
            issues.append(ConfigIssue(filename, line, found.path, found.message, found.hint))
        if not issues:
            return config
    raise ConfigError(issues)


def resolve_defaults(config: FederationConfig) -> FederationConfig:
    """Fill in the derived defaults (the '' placeholders of the model)."""
    federation = config.federation.name

    def cluster(c: Cluster) -> Cluster:
        gateway: GatewaySpec = c.gateway
        if not gateway.bind:
            gateway = dataclasses.replace(gateway, bind=gateway.address)
        return dataclasses.replace(
            c,
            network=c.network or c.name,
            trust_domain=c.trust_domain or default_trust_domain(c.name, federation),
            gateway=gateway,
        )

    def workload(w: Workload) -> Workload:
        return dataclasses.replace(w, service_account=w.service_account or w.name)

    return dataclasses.replace(
        config,
        clusters=tuple(cluster(c) for c in config.clusters),
        workloads=tuple(workload(w) for w in config.workloads),
    )


def _line_of(lines: dict[str, int], path: str) -> int:
    """Line of ``path``, or of its nearest recorded ancestor."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return lines.get("", 0)
