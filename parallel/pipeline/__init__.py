"""Where a boundary is crossed: a pipeline stage's part of a step (``step``), the op order of GPipe
and 1F1B (``schedule``), and subspace-compressed boundaries (``subspace``)."""
