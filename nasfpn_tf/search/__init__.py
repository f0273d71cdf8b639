"""The NAS-FPN architecture search (paper §3, §4.2): the search space, its controllers, the
proxy task and the Ray Tune runner."""
