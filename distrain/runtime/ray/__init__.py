"""The Ray launch mode: the driver's pool (``pool``), one actor per worker (``host``), the Coordinator actor."""
