"""Federated learning: pure math (pfa, det, cpa), parameter roles, aggregation strategies, sites."""
