"""The Twisted-free core: what goes on the wire and the rules about it.

``codec`` (frames), ``messages`` (the broker's message codec and topic
rule), ``errors`` (error texts and exceptions), ``printable`` (escaping
peer-chosen text), ``deadlines`` and ``ratelimit``. Nothing here imports
Twisted (tests/test_core_imports.py proves it), so this package holds no
re-exports: import the module you need.

    from pulsyflux.wire import codec
"""
