"""The NAS-FPN architecture search (paper §3, §4.2)."""
