"""The sidecar's HTTP layer: pure decision cores and sans-IO protocol helpers.

Nothing here imports trio or reads a clock; ``now`` and ``random.Random`` come
from the caller. The trio adapter wires these pieces (see docs/http.md):

* :mod:`.paths`: request-target normalisation before any matching.
* :mod:`.routes`: config routes compiled into a most-specific-first matcher.
* :mod:`.splits`: weighted subset choice and subset endpoint filters.
* :mod:`.circuit`: circuit breaking (503 + ``x-meshfed-overloaded``) and outlier feed.
* :mod:`.faults`: per-route delay/abort injection for drills.
* :mod:`.tracing`: W3C ``traceparent``/``tracestate``.
* :mod:`.accesslog`: the JSON access log line and the Prometheus adapter.
* :mod:`.headers`: hop-by-hop header removal shared by both protocols.
* :mod:`.h1`: HTTP/1.1 framing over h11 with request-smuggling defences.
* :mod:`.h2proxy`, :mod:`.grpc`: HTTP/2 stream-to-stream mapping and gRPC status.

Each public name is exported from its own module only (no re-exports here).
"""
