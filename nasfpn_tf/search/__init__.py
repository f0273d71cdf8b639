"""The architecture search of the paper (§3, §4.2): the search space and its controllers."""
