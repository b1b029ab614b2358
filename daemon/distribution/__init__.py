"""Bundles distributed by digest (issue #18): an instance that needs a bundle it does not hold
fetches it from a bundle source, verifies it against the digest before anything is unpacked,
stores it in its own registry and reuses it.

- :mod:`.sources` the :class:`~.sources.BundleSource` interface and its errors;
- :mod:`.peers`   other instances' admin APIs (``GET /bundles/<digest>``), and the holders the
  control topic's release events name;
- :mod:`.fetch`   the :class:`~.fetch.Fetcher`: which sources, in which order, verification,
  storing, one download per digest at a time, and what ``/status`` shows meanwhile.

Every source is untrusted by design: content addressing decides what is accepted.
"""
