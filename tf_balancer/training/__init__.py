"""Training: ``BalanceCallback`` and what happens at the end of ``fit``.

* :mod:`~tf_balancer.training.callback`: ``BalanceCallback`` (*when* things happen).
* :mod:`~tf_balancer.training.finalize`: compaction, fine-tuning, the report (*what* happens).
* :mod:`~tf_balancer.training.state`: checkpointable state and the mask applier.
* :mod:`~tf_balancer.training.ramp`: the target ramp between rebalances.
"""
