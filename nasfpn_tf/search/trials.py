"""One search trial as Ray Tune runs it: a worker trains one architecture on the proxy task.

`train_architecture` is the Tune trainable. It runs in a worker process (on any node of the
cluster) that Tune reuses for trial after trial, so it sets TensorFlow's thread pools itself
(Ray sets only OMP_NUM_THREADS; every trial asks for the same count) before anything imports
TensorFlow, reuses a result that another worker already stored for the same architecture key,
and stores its own result atomically before reporting it: a driver killed after the training
finds it there on its next run. This module loads no TensorFlow: a worker of the synthetic proxy
never does (its trials take a second, not a TensorFlow import).
"""
import json
import re
import time
from typing import Any, Dict, Sequence

import numpy as np

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search.journal import ResultStore
from nasfpn_tf.search.space import SearchSpace

# `synthetic` trains nothing: its AP is the fraction of the controller's decisions that agree
# with a target table. It tests the search machinery (Ray, the journal, resuming) and compares
# controllers in seconds; `cpu` and `paper` train (nasfpn_tf.search.proxy).
PROXIES = ('cpu', 'paper', 'synthetic')
# Seeds the synthetic target where the space has no NAS-FPN: not a controller's seed, so that a
# random search does not draw the target first.
TARGET_SEED = 20190416


def synthetic_target(space: SearchSpace) -> Sequence[specs_lib.BlockSpec]:
  """The table the synthetic reward aims at: the paper's NAS-FPN where the space holds it, else a
  fixed sample."""
  if space.contains(specs_lib.NASFPN):
    return specs_lib.NASFPN
  return space.sample(np.random.default_rng(TARGET_SEED))


def synthetic_result(space: SearchSpace, block_specs) -> Dict[str, Any]:
  """{'ap': the fraction of decisions that agree with `synthetic_target`, 'flops': 0}.

  Decisions are read off the canonical key (level, op, input pair per cell), so samples that
  build the same network get the same reward, as a trained proxy gives them.
  """
  def decisions(specs):
    return [field for cell in space.key(specs).split('/') for field in re.split('[:,]', cell)]
  sample, target = decisions(specs_lib.resolve(block_specs)), decisions(synthetic_target(space))
  return {'ap': float(np.mean([a == b for a, b in zip(sample, target)])), 'flops': 0}


def train_architecture(config: Dict[str, Any]) -> None:
  """The Tune trainable: reports the trial's result (`result` is the proxy's dict)."""
  # pylint: disable=g-import-not-at-top  Ray and TensorFlow load in the worker, in this order.
  import ray
  from ray import tune
  started = time.time()
  store = ResultStore(config['results_dir'])
  result = store.get(config['key'])
  reused = result is not None
  if not reused:
    result = _run_proxy(config)
    store.put(config['key'], result)
  # As JSON text: Tune flattens nested dicts in what it passes on.
  tune.report({'result_json': json.dumps(result), 'reused': reused,
               'seconds': time.time() - started,
               'node_id': ray.get_runtime_context().get_node_id()})


def _run_proxy(config: Dict[str, Any]) -> Dict[str, Any]:
  if config['proxy'] == 'synthetic':
    time.sleep(config.get('synthetic_seconds', 0.0))
    return synthetic_result(SearchSpace.from_config(config['space']), config['block_specs'])
  from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return proxy.run_trial(
      config['block_specs'], proxy=config['proxy'], seed=config['seed'],
      work_dir=config['work_dir'], gin_bindings=config['gin_bindings'],
      num_threads=max(1, int(config['cpus_per_trial'])), data_dir=config['data_dir'],
      backbone_checkpoint=config.get('backbone_checkpoint'),
      num_seeds=config.get('proxy_seeds', 1)).to_dict()
