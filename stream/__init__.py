"""Real-time sensor stream pipeline and daemon."""
