"""Where a round's exchange happens: outer optimisers over one segment's parameters.

``base.OuterOptimizer`` is the seam; ``pseudo_gradient`` (DiLoCo, SparseLoCo) and ``ddp`` the
algorithms; ``exchange`` encodes, all-gathers, validates, bounds and aggregates frames; ``step``
is the outer SGD step (momentum, delayed apply); ``build`` makes the configured one.
"""
