"""The deployment config: one YAML document describing one federation.

Public API (import from here):

* :func:`load_config` / :func:`parse_config` -> :class:`FederationConfig`, or
  :class:`ConfigError` carrying every :class:`ConfigIssue` found;
* the model dataclasses (``federation.config.model``);
* :func:`parse_duration` / :func:`format_duration`;
* :func:`build_schema` / :func:`render_schema` (JSON Schema) and :func:`summarize`.

The format is documented in docs/config.md.
"""

from federation.config.durations import InvalidDuration, format_duration, parse_duration
from federation.config.errors import ConfigError, ConfigIssue
from federation.config.loader import default_trust_domain, load_config, parse_config
from federation.config.model import (
    AgentSpec,
    Authorization,
    CircuitBreaking,
    Cluster,
    ConnectionPool,
    Failover,
    Fault,
    FaultAbort,
    FaultDelay,
    FederationConfig,
    FederationSpec,
    GatewayProbeSettings,
    GatewaySpec,
    HeaderMatch,
    OutlierDetection,
    Policy,
    PolicySource,
    Retries,
    Route,
    RouteMatch,
    Serves,
    Service,
    ServiceDefault,
    ServicePort,
    Settings,
    StoreSettings,
    Subset,
    Timeouts,
    TrafficPolicy,
    Upstream,
    WeightedSubset,
    Workload,
)
from federation.config.scalars import HostPort, ServiceRef
from federation.config.schema import build_schema, render_schema
from federation.config.summary import summarize

__all__ = [
    "AgentSpec",
    "Authorization",
    "CircuitBreaking",
    "Cluster",
    "ConfigError",
    "ConfigIssue",
    "ConnectionPool",
    "Failover",
    "Fault",
    "FaultAbort",
    "FaultDelay",
    "FederationConfig",
    "FederationSpec",
    "GatewayProbeSettings",
    "GatewaySpec",
    "HeaderMatch",
    "HostPort",
    "InvalidDuration",
    "OutlierDetection",
    "Policy",
    "PolicySource",
    "Retries",
    "Route",
    "RouteMatch",
    "Serves",
    "Service",
    "ServiceDefault",
    "ServicePort",
    "ServiceRef",
    "Settings",
    "StoreSettings",
    "Subset",
    "Timeouts",
    "TrafficPolicy",
    "Upstream",
    "WeightedSubset",
    "Workload",
    "build_schema",
    "default_trust_domain",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "render_schema",
    "summarize",
]
