"""Several pulsyflux servers acting as one, through Redis (docs/cluster.md).

Nothing here is imported unless ``--cluster`` is given: a server without it
needs neither Redis nor hiredis.
"""
