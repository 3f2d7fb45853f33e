"""Importance criteria, attention weights and the cost-aware balancer."""
