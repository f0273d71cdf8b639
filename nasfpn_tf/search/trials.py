"""One search trial as Ray Tune runs it: a worker trains one architecture on the proxy task.

`train_architecture` is the Tune trainable. It runs in a worker process (on any node of the
cluster) that Tune reuses for trial after trial, so it sets TensorFlow's thread pools itself
(Ray sets only OMP_NUM_THREADS; every trial asks for the same count) before anything imports
TensorFlow, reuses a result that another worker already stored for the same architecture key,
and stores its own result atomically before reporting it: a driver killed after the training
finds it there on its next run. This module loads no TensorFlow: a worker of the synthetic proxy
never does (its trials take a second, not a TensorFlow import).

Under `--scheduler=asha` (`schedulers`) the config carries `report_steps`: after each of them the
trial reports its held-out result so far (`step`, `reward`, `final`: False) and Tune's ASHA may
stop it there (Tune then ends the trial at that report); the last report (`final`: True) is the
whole trial's result, whose `reports` keep the intermediate ones.
"""
import json
import math
import os
import re
import time
from typing import Any, Dict, Sequence

import numpy as np

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search import rewards
from nasfpn_tf.search import space as space_lib
from nasfpn_tf.search.journal import ResultStore

# `synthetic` trains nothing: its AP is the fraction of the controller's decisions that agree
# with a target table. It tests the search machinery (Ray, the journal, resuming) and compares
# controllers in seconds; `cpu`, `e2e` and `paper` train (nasfpn_tf.search.proxy).
PROXIES = ('cpu', 'e2e', 'paper', 'synthetic')
# Seeds the synthetic target where the space has no NAS-FPN: not a controller's seed, so that a
# random search does not draw the target first.
TARGET_SEED = 20190416
# The synthetic proxy's "training": its reward rises as sqrt(step / SYNTHETIC_STEPS) to its final
# value (`synthetic_curve`), and --synthetic_seconds are spread evenly over the steps.
SYNTHETIC_STEPS = 100


def synthetic_target(space) -> Sequence[specs_lib.BlockSpec]:
  """The spec the synthetic reward aims at: the paper's NAS-FPN where the space holds it, else a
  fixed sample (of any space of `space.spaces()`)."""
  if space.contains(specs_lib.NASFPN):
    return specs_lib.NASFPN
  return space.sample(np.random.default_rng(TARGET_SEED))


def synthetic_result(space, block_specs) -> Dict[str, Any]:
  """{'ap': the fraction of decisions that agree with `synthetic_target`, 'flops': 0}.

  Decisions are read off the canonical key (e.g. NAS-FPN's level, op, input pair per cell), so
  samples that build the same network get the same reward, as a trained proxy gives them.
  """
  def decisions(specs):
    return [field for cell in space.key(specs).split('/') for field in re.split('[:,]', cell)]
  sample, target = decisions(block_specs), decisions(synthetic_target(space))
  return {'ap': float(np.mean([a == b for a, b in zip(sample, target)])), 'flops': 0}


def synthetic_curve(final_ap: float, step: int) -> float:
  """The synthetic proxy's AP after `step` of its SYNTHETIC_STEPS: final_ap x sqrt(step / S),
  rising fast then slowly, as a training's does; it keeps the final ranking at every step."""
  return final_ap * math.sqrt(step / SYNTHETIC_STEPS)


def train_architecture(config: Dict[str, Any]) -> None:
  """The Tune trainable: reports the trial's result (`result` is the proxy's dict), after its
  intermediate results when the config asks for them (`report_steps`)."""
  # pylint: disable=g-import-not-at-top  Ray and TensorFlow load in the worker, in this order.
  import ray
  from ray import tune
  started = time.time()
  store = ResultStore(config['results_dir'])
  node_id = ray.get_runtime_context().get_node_id()
  reports = []

  def report(step: int, result: Dict[str, Any], final: bool) -> None:
    # As JSON text: Tune flattens nested dicts in what it passes on.
    metrics = {'result_json': json.dumps(result), 'reused': reused,
               'seconds': time.time() - started, 'node_id': node_id, 'step': step,
               'final': final, 'niceness': os.nice(0)}
    if config.get('reward') is not None:  # what ASHA compares
      metrics['reward'] = rewards.reward(result, **config['reward'])
    tune.report(metrics)  # Tune ends the trial here (SystemExit) when ASHA stops it.

  def intermediate(step: int, partial: Dict[str, Any]) -> None:
    reports.append(dict(partial))
    report(step, {**partial, 'reports': list(reports)}, final=False)

  result = store.get(config['key'])
  reused = result is not None
  if not reused:
    result = _run_proxy(config, intermediate if config.get('report_steps') else None)
    if reports:
      result = {**result, 'reports': reports}
    store.put(config['key'], result)
  report(result.get('steps', config.get('max_steps', SYNTHETIC_STEPS)), result, final=True)


def _run_synthetic(config: Dict[str, Any], report) -> Dict[str, Any]:
  """The synthetic proxy's trial: waits --synthetic_seconds, spread over its steps, reporting
  `synthetic_curve` at `report_steps` when `report` is given."""
  result = synthetic_result(space_lib.from_config(config['space']), config['block_specs'])
  seconds, done = config.get('synthetic_seconds', 0.0), 0
  for step in (config.get('report_steps') or []) if report else []:
    time.sleep(seconds * (step - done) / SYNTHETIC_STEPS)
    done = step
    report(step, {'ap': synthetic_curve(result['ap'], step), 'flops': result['flops'],
                  'steps': step})
  time.sleep(seconds * (SYNTHETIC_STEPS - done) / SYNTHETIC_STEPS)
  return result


def _run_proxy(config: Dict[str, Any], report=None) -> Dict[str, Any]:
  if config['proxy'] == 'synthetic':
    return _run_synthetic(config, report)
  from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return proxy.run_trial(
      config['block_specs'], proxy=config['proxy'], seed=config['seed'],
      work_dir=config['work_dir'], gin_bindings=config['gin_bindings'],
      num_threads=max(1, int(config['cpus_per_trial'])), data_dir=config['data_dir'],
      backbone_checkpoint=config.get('backbone_checkpoint'),
      num_seeds=config.get('proxy_seeds', 1), report_steps=config.get('report_steps') or (),
      report=report, space=space_lib.from_config(config['space'])).to_dict()
