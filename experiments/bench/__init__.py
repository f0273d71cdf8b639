"""The parts of `experiments/benchmark.py`: ours against TF Model Garden's RetinaNet.

`models` builds both sides, `timing` alternates their calls, `latency`, `training` (with
`op_profile`), `memory` and `ap` measure, `rows` holds the typed results and their JSON form,
`report` prints the table.
"""
