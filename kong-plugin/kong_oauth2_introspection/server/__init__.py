"""Kong's side of the wire: the plugin server Kong starts (listener, the
events it drives, the instances Kong starts and closes) and the registry that
shares one runtime among equal configs.

Shared wing: it imports the top level and ``ops``; it knows plugins only as the
classes ``plugins`` hands it, never their internals.
"""
