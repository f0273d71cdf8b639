"""Rewards of the search: the paper's AP, AP traded against compute (MnasNet's form), or the
negative held-out loss (NAS-FCOS's).

`ap` (paper §4.2, the default): the proxy's COCO AP on the held-out split.
`ap_flops`: AP x (FLOPs / target_flops)^w (Tan et al., MnasNet, with FLOPs for latency): with
w < 0 an architecture over the budget loses reward smoothly and one under it gains a little, so
a search can aim at a compute budget (e.g. a NAS-FPNLite for phones). FLOPs are the trial's
`TrialResult.flops` (`utils.model_stats.count_flops`: the whole detector, backbone + pyramid +
head, at batch 1, 2 FLOPs per multiply-add).
`neg_loss`: -(the trained candidate's focal + box loss on the held-out images), the training loss
(`RetinaNetLoss`) on every held-out image at once (`cpu_proxy.heldout_loss`). NAS-FCOS (§4.4.1)
found it smoother than AP after short proxy trainings. The CPU proxy measures it; the paper proxy
does not.

A result trained with several seeds (`--proxy_seeds`, its per-seed results under 'seeds') is
rewarded the mean of its seeds' rewards.
"""
from typing import Any, Mapping, Optional, Union

import gin
import numpy as np

KINDS = ('ap', 'ap_flops', 'neg_loss')
# The proxies that measure the held-out loss.
_LOSS_PROXIES = ('cpu',)


def _field(result: Union[Mapping[str, Any], Any], name: str) -> Any:
  return result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)


def check(kind: str, target_flops: Optional[float] = None, proxy: Optional[str] = None) -> None:
  """Raises ValueError naming the flag at fault when a reward of `kind` cannot be computed (for
  the trials of `proxy`, when given)."""
  if kind not in KINDS:
    raise ValueError(f'unknown reward {kind!r} (--reward); known: {list(KINDS)}.')
  if kind == 'ap_flops' and target_flops is None:
    raise ValueError("reward 'ap_flops' needs a FLOPs budget: pass --target_flops=... (e.g. "
                     '3.5e9), the FLOPs the architecture should cost.')
  if kind == 'ap_flops' and target_flops <= 0:
    raise ValueError(f'--target_flops must be > 0, got {target_flops}.')
  if kind == 'neg_loss' and proxy is not None and proxy not in _LOSS_PROXIES:
    raise ValueError(f"reward 'neg_loss' (--reward) is the held-out loss, which only "
                     f'--proxy={_LOSS_PROXIES[0]} measures; --proxy={proxy} gives AP '
                     '(--reward=ap).')


@gin.configurable(denylist=['result', 'kind', 'target_flops'])
def reward(result, kind: str = 'ap', target_flops: Optional[float] = None,
           flops_weight: float = -0.07) -> float:
  """The reward of a trial's result (a `proxy.TrialResult` or its `to_dict()`): with per-seed
  results ('seeds'), the mean of their rewards.

  kind: one of KINDS. target_flops: the budget of `ap_flops` (--target_flops). flops_weight: w
  of `ap_flops` (gin `reward.flops_weight`; MnasNet's soft constraint uses -0.07).
  """
  check(kind, target_flops)
  seeds = _field(result, 'seeds')
  if seeds:
    return float(np.mean([reward(seed, kind, target_flops, flops_weight) for seed in seeds]))
  if kind == 'neg_loss':
    loss = _field(result, 'heldout_loss')
    if loss is None:
      raise ValueError("reward 'neg_loss': the trial measured no held-out loss (its proxy gives "
                       'AP only; use --reward=ap).')
    return -float(loss)
  ap = float(_field(result, 'ap'))
  if kind == 'ap':
    return ap
  flops = float(_field(result, 'flops'))
  if flops <= 0:
    raise ValueError(f'reward ap_flops: the trial has no FLOP count (flops={flops}).')
  return ap * (flops / target_flops)**flops_weight
