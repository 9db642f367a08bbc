"""Where answers are kept: the token cache with its single-flight and the
Redis store a Kong cluster shares (``ops.purge`` empties both): ``tokens``
(the token cache), ``node`` (the LMDB level every process of a plugin server
shares), ``store`` (the Redis API: leases, indexes, pub/sub, purges) with its
``connection``, ``sealing``, ``backoff`` and ``scripts``, ``tombstones``, and
``replays`` (DPoP proofs and signed answers seen once per node).

Shared wing: it imports the top level, ``idp`` and ``ops``; never a plugin's wing.
"""
