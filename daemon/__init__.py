"""failoverd: serve ML models on Kafka streams, fail over to a standby release exactly once."""

__version__ = "0.1.0"
