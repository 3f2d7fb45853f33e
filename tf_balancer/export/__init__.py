"""Export: SavedModel post-processing and the atomic writers of results.

* :mod:`~tf_balancer.export.savedmodel`: ``optimize_saved_model`` (load, optimize, verify, write).
* :mod:`~tf_balancer.export.keras_path`: SavedModels that load as Keras models.
* :mod:`~tf_balancer.export.graph_path`: plain SavedModels, optimized on the GraphDef.
* :mod:`~tf_balancer.export.signatures`: serving signatures: specs, feeds, verification, saving.
* :mod:`~tf_balancer.export.writers`: ``atomic_directory`` and ``export_result``.
"""
