"""failoverd's release machinery inside other stream frameworks (docs/faust.md).

- :mod:`daemon.integrations.scoring`: active and standby releases in model workers, the daemon's
  failover signals and policy, the control topic (no framework).
- :mod:`daemon.integrations.faust`: the faust-streaming glue (needs ``failoverd[faust]``).
- :mod:`daemon.integrations.metrics`: their Prometheus metrics (label ``integration``).
"""
