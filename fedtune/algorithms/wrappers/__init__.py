"""Wrappers around any method's server side: robust aggregation, client-level DP. Each holds the inner method and
refuses an incompatible one by its declared capabilities, never by name."""
