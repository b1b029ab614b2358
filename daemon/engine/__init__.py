"""The streaming engine: fetch, decode/validate, predict, encode, produce, checkpoint."""
