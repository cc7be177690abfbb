"""Files, images and the terminal: what the rest of the package reads and writes.

Rooms: ``files`` (the regular-file checks, atomic writes, where outputs may go), ``image_io`` (reading and
writing images: the only Pillow code), ``console`` (what the terminal shows: notes, warnings, the progress
bar, the last line) and ``cache`` (the user's cache folder). Nothing here imports Lightning.
"""
