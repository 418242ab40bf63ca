"""Built-in psmsearch plugins, installed as ``psmsearch.plugins``.

Each plugin module here (``token_state``, ``tasks``, ``affine``) is an ordinary plugin: it defines
``@hookimpl`` functions and is loaded through the same mechanism as a third-party package
(``psmsearch.registry.DEFAULT_PLUGINS``). The ``affine_*`` modules are not plugins: they hold the code
of the affine family, which ``affine`` registers (and re-exports).
"""
