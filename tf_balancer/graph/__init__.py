"""Model graph analysis: tracing, the layer graph, channel groups and costs."""
