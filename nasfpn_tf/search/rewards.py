"""Rewards of the search: the paper's AP, or AP traded against compute (MnasNet's form).

`ap` (paper §4.2, the default): the proxy's COCO AP on the held-out split.
`ap_flops`: AP x (FLOPs / target_flops)^w (Tan et al., MnasNet, with FLOPs for latency): with
w < 0 an architecture over the budget loses reward smoothly and one under it gains a little, so
a search can aim at a compute budget (e.g. a NAS-FPNLite for phones). FLOPs are the trial's
`TrialResult.flops` (`utils.model_stats.count_flops`: the whole detector, backbone + pyramid +
head, at batch 1, 2 FLOPs per multiply-add).
"""
from typing import Any, Mapping, Optional, Union

import gin

KINDS = ('ap', 'ap_flops')


def _field(result: Union[Mapping[str, Any], Any], name: str) -> float:
  return float(result[name] if isinstance(result, Mapping) else getattr(result, name))


def check(kind: str, target_flops: Optional[float] = None) -> None:
  """Raises ValueError naming the flag at fault when a reward of `kind` cannot be computed."""
  if kind not in KINDS:
    raise ValueError(f'unknown reward {kind!r} (--reward); known: {list(KINDS)}.')
  if kind == 'ap_flops' and target_flops is None:
    raise ValueError("reward 'ap_flops' needs a FLOPs budget: pass --target_flops=... (e.g. "
                     '3.5e9), the FLOPs the architecture should cost.')
  if kind == 'ap_flops' and target_flops <= 0:
    raise ValueError(f'--target_flops must be > 0, got {target_flops}.')


@gin.configurable(denylist=['result', 'kind', 'target_flops'])
def reward(result, kind: str = 'ap', target_flops: Optional[float] = None,
           flops_weight: float = -0.07) -> float:
  """The reward of a trial's result (a `proxy.TrialResult` or its `to_dict()`).

  kind: one of KINDS. target_flops: the budget of `ap_flops` (--target_flops). flops_weight: w
  of `ap_flops` (gin `reward.flops_weight`; MnasNet's soft constraint uses -0.07).
  """
  check(kind, target_flops)
  ap = _field(result, 'ap')
  if kind == 'ap':
    return ap
  flops = _field(result, 'flops')
  if flops <= 0:
    raise ValueError(f'reward ap_flops: the trial has no FLOP count (flops={flops}).')
  return ap * (flops / target_flops)**flops_weight
