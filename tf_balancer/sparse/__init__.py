"""Everything of ``mode="sparse"``: unstructured weight pruning with tfmot (Keras 2 only).

* :mod:`~tf_balancer.sparse._tfmot`: the tfmot import boundary (imported on first use).
* :mod:`~tf_balancer.sparse.wrapping`: wrap, update masks, strip, compressed sizes.
* :mod:`~tf_balancer.sparse.schedule`: the variable-driven pruning schedule.
* :mod:`~tf_balancer.sparse.budget`: per-layer sparsity budgets for a global target.
* :mod:`~tf_balancer.sparse.mode`: what the callback does in sparse mode.

Importing this package does not import tfmot.
"""
