"""Progress lines and timing: calls of both sides taken in turns, so background load hits all."""
import os
import time
from typing import Any, Callable, Dict

import numpy as np
import tensorflow as tf

from bench.rows import Timing


def say(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} load {os.getloadavg()[0]:.2f}] {message}', flush=True)


def run(fn: Callable, *args) -> float:
  """Seconds of one call of `fn`, its outputs fetched."""
  start = time.perf_counter()
  tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, 'numpy') else t, fn(*args))
  return time.perf_counter() - start


def alternate(calls: Dict[str, Callable[[], Any]], repeats: int, what: str,
              warmup: int = 1) -> Dict[str, Timing]:
  """Times each call `repeats` times, alternating the calls (order reversed every round so that
  background load hits all alike); returns {name: Timing} in seconds. The first call (tracing,
  one-off setup) and `warmup` - 1 more are untimed in the median."""
  first = {}
  for name, call in calls.items():
    first[name] = run(call)
    say(f'  {what} {name}: first call {first[name]:.2f} s')
    for _ in range(warmup - 1):
      run(call)
  times = {name: [] for name in calls}
  names = list(calls)
  for round_index in range(repeats):
    for name in (names if round_index % 2 == 0 else names[::-1]):
      times[name].append(run(calls[name]))
    say(f'  {what} round {round_index + 1}/{repeats}: ' +
        ', '.join(f'{n} {times[n][-1]:.3f} s' for n in names))
  return {name: Timing(first=first[name], median=float(np.median(times[name])),
                       min=float(np.min(times[name]))) for name in calls}
