"""Failure detection and failover: signals, anti-flapping policy, the controller."""
