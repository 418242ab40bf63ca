"""Built-in psmsearch plugins, installed as ``psmsearch.plugins``.

Each module here is an ordinary plugin: it defines ``@hookimpl`` functions and is loaded through the
same mechanism as a third-party package (``psmsearch.registry.DEFAULT_PLUGINS``).
"""
