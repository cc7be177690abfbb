"""Batch: many content x style pairs from one configuration. Rooms: ``pairs`` (which pairs, their names and
settings), ``command`` (the ``batch`` command line), ``runs`` (running the pairs, skipping the finished ones)
and ``launch`` (over processes or nodes)."""
