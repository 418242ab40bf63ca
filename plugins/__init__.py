"""Built-in psmsearch plugins, installed as ``psmsearch.plugins``.

Each plugin module here (``token_state``, ``tasks``, ``affine``: ``psmsearch.registry.DEFAULT_PLUGINS``)
is an ordinary plugin: it defines ``@hookimpl`` functions and is loaded through the same mechanism as a
third-party package. The other modules are helpers those plugins import and re-export (the tasks of
``tasks`` live in ``group_words``, ``mqar`` and ``byte_lm``; the affine family's code in the
``affine_*`` modules); they define no hooks and are not loaded as plugins.
"""
