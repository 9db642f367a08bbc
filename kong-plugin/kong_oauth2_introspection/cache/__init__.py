"""Where answers are kept: the token cache with its single-flight and the
Redis store a Kong cluster shares (``ops.purge`` empties both).

Shared wing: it imports the top level, ``idp`` and ``ops``; never a plugin's wing.
"""
