"""Scale-out: several ttaserve replicas behind Ray Serve's gRPC proxy.

- :mod:`ttaserve.deploy.hashring` — consistent hashing of ``(model, sequence_id)`` onto replicas.
- :mod:`ttaserve.deploy.stores` — where replicas keep session snapshots (a shared directory or
  Redis), behind one small interface.
- :mod:`ttaserve.deploy.shared` — a replica's view of that store: restore a sequence that
  arrives from elsewhere, write it back after every request or every interval.
- :mod:`ttaserve.deploy.router`, :mod:`ttaserve.deploy.replica`, :mod:`ttaserve.deploy.cli` —
  the Ray Serve parts (``pip install ttaserve[ray]``); nothing else here imports Ray.
"""
