"""Everything that crosses a wire: codecs, wire frames, transports and the network model.

``distrain.comm.codecs`` (SparseLoCo and dense codecs behind one ``Codec`` interface), ``distrain.comm.wire``
(validated msgpack + zstd frames), ``distrain.comm.transport`` (the ``Transport`` interface),
``distrain.comm.simulated`` + ``distrain.comm.network`` (in-process transport with a network model),
``distrain.comm.errors`` (one exception class per rejection reason). Imports nothing of
distrain's other packages (it sits at the bottom: launch → distrain core → parallel → comm).
"""
