"""Entry points: ``python -m launch.simulate``, ``torchrun … -m launch.torchrun``, ``python -m launch.ray``.

Nothing imports this package; each module is a thin command line over ``distrain``.
"""
