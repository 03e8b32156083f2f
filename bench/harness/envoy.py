"""Envoy bootstrap configs for the comparison topologies (pure: paths and ports in, dicts out).

Every config is static (no xDS), one proxy per process, admin on ``127.0.0.1:0``
(the bound address is written to ``--admin-address-path``) and every listener on
port 0 (the bound port is read back from the admin ``/listeners`` endpoint), so no
port is ever guessed. The roles mirror meshfed's data path (``docs/sni.md``):

* ``client_sidecar``: plain TCP in, inner mTLS out with the meshfed SNI, the
  server's SPIFFE ID pinned by URI SAN;
* ``server_sidecar``: inner mTLS in (client certificate required, caller's SPIFFE
  ID pinned), plain TCP to the backend;
* ``passthrough_gateway``: ``tls_inspector`` + a filter chain matching the SNI,
  ``tcp_proxy`` on to the server sidecar; never decrypts;
* ``tunnel_gateway_out``: the same SNI match, but ``tcp_proxy`` with
  ``tunneling_config`` carries each connection as an HTTP/2 CONNECT stream over a
  pooled gateway-to-gateway mTLS connection;
* ``tunnel_gateway_in``: mTLS + HTTP/2 ``http_connection_manager`` accepting
  CONNECT (``connect_matcher`` route with a CONNECT ``upgrade_config``) and relaying
  the stream's bytes to the server sidecar.

TLS everywhere: TLS 1.3 only, P-256 SVIDs from ``trust/``, and every handshake
full (clients keep no session keys, servers issue no tickets), as meshfed's
``trust.tls`` servers do, so the new-connection scenario counts real handshakes.
"""

from __future__ import annotations

from typing import Any, Final

from bench.harness.pki import Pki, SvidFiles

Config = dict[str, Any]

LISTENER: Final = "main"
"""Name of each config's one listener (looked up in admin ``/listeners``)."""

_TLS_SOCKET: Final = "envoy.transport_sockets.tls"
_TYPES: Final = "type.googleapis.com/envoy.extensions."


def _address(port: int) -> Config:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _common_tls(svid: SvidFiles, pki: Pki, peer_id: str, alpn: list[str]) -> Config:
    common: Config = {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(svid.chain)},
                "private_key": {"filename": str(svid.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(pki.roots)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_id}}],
        },
    }
    if alpn:
        common["alpn_protocols"] = alpn
    return common


def downstream_tls(svid: SvidFiles, pki: Pki, peer_id: str, alpn: list[str]) -> Config:
    """Server side of an mTLS hop: client certificate required, ``peer_id`` pinned, no tickets."""
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TYPES + "transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "disable_stateless_session_resumption": True,
            "disable_stateful_session_resumption": True,
            "common_tls_context": _common_tls(svid, pki, peer_id, alpn),
        },
    }


def upstream_tls(svid: SvidFiles, pki: Pki, peer_id: str, sni: str, alpn: list[str]) -> Config:
    """Client side of an mTLS hop: sends ``sni``, pins ``peer_id``, never resumes a session."""
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TYPES + "transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "max_session_keys": 0,
            "common_tls_context": _common_tls(svid, pki, peer_id, alpn),
        },
    }


def cluster(name: str, port: int, transport: Config | None = None, http2: bool = False) -> Config:
    """A static cluster of one loopback endpoint."""
    out: Config = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if transport is not None:
        out["transport_socket"] = transport
    if http2:
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPES + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return out


def tcp_proxy(cluster_name: str, tunnel_host: str | None = None) -> Config:
    """The L4 relay filter; with ``tunnel_host`` each connection becomes a CONNECT stream."""
    typed: Config = {
        "@type": _TYPES + "filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp",
        "cluster": cluster_name,
    }
    if tunnel_host is not None:
        typed["tunneling_config"] = {"hostname": tunnel_host}
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": typed}


def connect_terminator(cluster_name: str) -> Config:
    """HTTP/2 connection manager that accepts CONNECT and relays each stream to ``cluster_name``."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _TYPES + "filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "connect",
            "codec_type": "HTTP2",
            "http2_protocol_options": {"allow_connect": True},
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "route_config": {
                "name": "connect",
                "virtual_hosts": [
                    {
                        "name": "tunnel",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"connect_matcher": {}},
                                "route": {
                                    "cluster": cluster_name,
                                    "upgrade_configs": [
                                        {"upgrade_type": "CONNECT", "connect_config": {}}
                                    ],
                                },
                            }
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _TYPES + "filters.http.router.v3.Router"},
                }
            ],
        },
    }


def listener(
    filters: list[Config],
    transport: Config | None = None,
    server_names: list[str] | None = None,
) -> Config:
    """The config's one listener on ``127.0.0.1:0``; ``server_names`` adds SNI matching."""
    chain: Config = {"filters": filters}
    if transport is not None:
        chain["transport_socket"] = transport
    out: Config = {"name": LISTENER, "address": _address(0), "filter_chains": [chain]}
    if server_names is not None:
        chain["filter_chain_match"] = {"server_names": server_names}
        out["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": _TYPES + "filters.listener.tls_inspector.v3.TlsInspector"
                },
            }
        ]
    return out


def bootstrap(node: str, listener_config: Config, clusters: list[Config]) -> Config:
    """A complete static bootstrap with admin on an ephemeral loopback port."""
    return {
        "node": {"id": node, "cluster": "bench"},
        "admin": {"address": _address(0)},
        "static_resources": {"listeners": [listener_config], "clusters": clusters},
    }


def client_sidecar(pki: Pki, upstream_port: int) -> Config:
    """Plain TCP in; inner mTLS (client SVID, server ID pinned, meshfed SNI) out."""
    server_id = str(pki.svids["server-sidecar"].spiffe_id)
    tls = upstream_tls(pki.svids["client-sidecar"], pki, server_id, pki.sni, [])
    return bootstrap(
        "client-sidecar",
        listener([tcp_proxy("upstream")]),
        [cluster("upstream", upstream_port, tls)],
    )


def server_sidecar(pki: Pki, backend_port: int) -> Config:
    """Inner mTLS in (caller's ID pinned); plain TCP to the backend."""
    client_id = str(pki.svids["client-sidecar"].spiffe_id)
    tls = downstream_tls(pki.svids["server-sidecar"], pki, client_id, [])
    return bootstrap(
        "server-sidecar",
        listener([tcp_proxy("backend")], transport=tls),
        [cluster("backend", backend_port)],
    )


def passthrough_gateway(pki: Pki, sidecar_port: int) -> Config:
    """SNI-routed passthrough: only the benchmark's SNI matches; the bytes stay encrypted."""
    return bootstrap(
        "passthrough-gateway",
        listener([tcp_proxy("sidecar")], server_names=[pki.sni]),
        [cluster("sidecar", sidecar_port)],
    )


def tunnel_gateway_out(pki: Pki, peer_gateway_port: int) -> Config:
    """SNI-matched connections carried as CONNECT streams over pooled HTTP/2 mTLS."""
    peer_id = str(pki.svids["server-gateway"].spiffe_id)
    tls = upstream_tls(pki.svids["client-gateway"], pki, peer_id, "server-gateway", ["h2"])
    return bootstrap(
        "tunnel-gateway-out",
        listener([tcp_proxy("peer-gateway", tunnel_host=f"{pki.sni}:443")], server_names=[pki.sni]),
        [cluster("peer-gateway", peer_gateway_port, tls, http2=True)],
    )


def tunnel_gateway_in(pki: Pki, sidecar_port: int) -> Config:
    """Gateway-to-gateway mTLS (peer gateway's ID pinned), HTTP/2 CONNECT terminated."""
    peer_id = str(pki.svids["client-gateway"].spiffe_id)
    tls = downstream_tls(pki.svids["server-gateway"], pki, peer_id, ["h2"])
    return bootstrap(
        "tunnel-gateway-in",
        listener([connect_terminator("sidecar")], transport=tls),
        [cluster("sidecar", sidecar_port)],
    )
