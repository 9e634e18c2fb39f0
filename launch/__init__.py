"""Entry points: ``python -m distrain.launch.simulate``, ``torchrun … -m distrain.launch.torchrun``, ``python -m distrain.launch.ray``.

Nothing imports this package; each module is a thin command line over ``distrain``.
"""
