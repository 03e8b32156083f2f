"""The comparison benchmark: meshfed against Envoy and the bare network, on loopback.

Layers, each in one module:

* ``pki`` mints the SPIFFE SVIDs every topology presents (the project's own CA);
* ``envoy`` generates Envoy bootstrap configs (pure: paths and ports in, dicts out);
* ``topology`` launches one topology per driver (direct, envoy-*, meshfed-*) and
  tells how to reach it and which processes are the proxies;
* ``loadgen`` is the backend server and the multi-process plain-socket load generator;
* ``scenarios`` turns load runs into named metrics;
* ``report`` aggregates rounds into medians, ranges and ratios (Markdown + JSON).

``bench/run.py`` (``python -m bench.run``) drives them; ``meshfed bench run`` calls it.
"""
