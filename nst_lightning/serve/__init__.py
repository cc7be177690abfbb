"""The web app (``nst-lightning serve``): routes in :mod:`.app`, the job store and workers in :mod:`.jobs`, the page in
``static/``. Importing this package loads nothing heavy: the server's libraries load with :mod:`.app`."""
