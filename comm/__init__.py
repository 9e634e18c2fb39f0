"""Everything that crosses a wire: codecs, wire frames, transports and the network model.

``comm.codecs`` (SparseLoCo and dense codecs behind one ``Codec`` interface), ``comm.wire``
(validated msgpack + zstd frames), ``comm.transport`` (the ``Transport`` interface),
``comm.simulated`` + ``comm.network`` (in-process transport with a network model),
``comm.errors`` (one exception class per rejection reason). Imports nothing from distrain,
parallel or launch.
"""
