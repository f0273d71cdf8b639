"""Early stopping of weak trials: Ray Tune's asynchronous successive halving (`--scheduler=asha`).

ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning"; Ray Tune's
`AsyncHyperBandScheduler`) watches the held-out reward each trial reports at intermediate steps
of its proxy training. Rungs sit at `grace_period x reduction_factor^k` steps below `max_t`; a
trial that reaches a rung with a reward below the top 1/reduction_factor of the rewards recorded
there so far is stopped; the others go on to the next rung and, past the last, to `max_t`. There
is no waiting for a cohort: a trial is judged against whoever reached its rung before it (the
first ones always go on).

`max_t` is the proxy's own training length (`CpuProxy.train_steps`, or the synthetic proxy's
`trials.SYNTHETIC_STEPS`): a trial that is not stopped is exactly a trial without ASHA, its cosine
schedule included, so full trials of a search with and without ASHA give the same rewards.

A stopped trial's reward is its last reported reward: what ASHA compared at the rung where it
stopped it (see `docs/search.md` for why). The journal line says so (`stopped_at_step`), and a
resumed search feeds the journal's rewards back to the controller unchanged and replays the
journal's reports into a new ASHA's rungs (`replay`).

This module loads no TensorFlow and no Ray until `make_scheduler` is called.
"""
import dataclasses
import math
import types
from typing import Any, Callable, Dict, List, Optional, Sequence

SCHEDULERS = ('none', 'asha')
DEFAULT_REDUCTION_FACTOR = 3.0
# What each trial reports to Tune: the time ASHA counts in, and the metric it compares.
TIME_ATTR = 'step'
METRIC = 'reward'


@dataclasses.dataclass(frozen=True)
class Asha:
  """Resolved ASHA settings. max_t: the proxy's train steps; report_every: 0 to report at the
  rungs only (the fewest held-out evaluations), else every report_every steps."""
  max_t: int
  grace_period: int
  reduction_factor: float
  report_every: int = 0

  def rungs(self) -> List[float]:
    """The rung milestones below max_t, ascending, as Ray's `_Bracket` places them (bracket 0)."""
    count = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
    milestones = [self.grace_period * self.reduction_factor**k for k in range(count)]
    return [m for m in milestones if m < self.max_t]

  def report_steps(self) -> List[int]:
    """The steps after which a trial evaluates and reports its held-out reward (the last step
    reports the trial's final result, so it is not among them)."""
    if self.report_every:
      return list(range(self.report_every, self.max_t, self.report_every))
    return sorted({math.ceil(m) for m in self.rungs()} - {self.max_t})


def check_name(scheduler: str, grace_period: Optional[int] = None,
               reduction_factor: Optional[float] = None, report_every: int = 0,
               proxy: Optional[str] = None, proxy_seeds: int = 1) -> None:
  """What can be checked before the proxy is built: ValueError naming the flag at fault."""
  if scheduler not in SCHEDULERS:
    raise ValueError(f'--scheduler={scheduler!r} is not one of {list(SCHEDULERS)}.')
  if scheduler == 'none':
    given = [f'--{name}={value}' for name, value in (
        ('asha_grace_period', grace_period), ('asha_reduction_factor', reduction_factor),
        ('report_every', report_every or None)) if value is not None]
    if given:
      raise ValueError(f'{", ".join(given)}: ASHA settings, but --scheduler=none; pass '
                       '--scheduler=asha or leave them out.')
    return
  if proxy in ('e2e', 'paper'):
    raise ValueError(f'--scheduler=asha needs intermediate reports, which --proxy={proxy} does '
                     'not make (its trials train with RetinaNetTrainer to the end); use '
                     '--proxy=cpu or --proxy=synthetic.')
  if proxy_seeds != 1:
    raise ValueError(f'--scheduler=asha with --proxy_seeds={proxy_seeds}: the seeds of a trial '
                     'train one after the other, so their steps do not count up once; use '
                     '--proxy_seeds=1.')


def resolve(scheduler: str, train_steps: int, steps_name: str,
            grace_period: Optional[int] = None, reduction_factor: Optional[float] = None,
            report_every: int = 0) -> Optional[Asha]:
  """The ASHA settings for trials of `train_steps` steps (`steps_name` names where that comes
  from, for errors), or None for --scheduler=none. Defaults: reduction factor 3 and a grace
  period of ceil(train_steps / 9), so that a trial is judged after about a ninth and a third of
  its steps. ValueError naming the flag at fault."""
  check_name(scheduler, grace_period, reduction_factor, report_every)
  if scheduler == 'none':
    return None
  factor = DEFAULT_REDUCTION_FACTOR if reduction_factor is None else float(reduction_factor)
  if not factor > 1:
    raise ValueError(f'--asha_reduction_factor={reduction_factor} must be > 1 (ASHA keeps the '
                     'top 1/factor of the trials at each rung).')
  if train_steps < 2:
    raise ValueError(f'--scheduler=asha: the proxy trains {train_steps} step(s) ({steps_name}), '
                     'so there is no step at which to stop a trial early.')
  grace = math.ceil(train_steps / factor**2) if grace_period is None else grace_period
  if not 1 <= grace < train_steps:
    raise ValueError(f'--asha_grace_period={grace_period} must be in 1..{train_steps - 1}: '
                     f'below the proxy\'s {train_steps} train steps ({steps_name}), the max_t '
                     'of ASHA.')
  if not 0 <= report_every < train_steps:
    raise ValueError(f'--report_every={report_every} must be in 0..{train_steps - 1} (0: at the '
                     f'rungs only; the proxy trains {train_steps} steps, {steps_name}).')
  return Asha(max_t=train_steps, grace_period=int(grace), reduction_factor=factor,
              report_every=int(report_every))


def make_scheduler(asha: Asha):
  """Ray Tune's AsyncHyperBandScheduler for `asha`: one bracket, the reported `reward` (higher
  is better) against the reported `step`."""
  from ray.tune.schedulers import AsyncHyperBandScheduler  # pylint: disable=g-import-not-at-top
  return AsyncHyperBandScheduler(
      time_attr=TIME_ATTR, metric=METRIC, mode='max', max_t=asha.max_t,
      grace_period=asha.grace_period, reduction_factor=asha.reduction_factor, brackets=1)


def replay(scheduler, records: Sequence[Dict[str, Any]],
           reward_fn: Callable[[Dict[str, Any]], float]) -> int:
  """Feeds the intermediate reports of the journal's trained lines (`result['reports']`) to
  `scheduler` through its public trial hooks, so that a resumed search's ASHA judges new trials
  against the rungs the earlier ones reached. Returns the number of trials replayed."""
  replayed = 0
  for record in records:
    reports = [] if record['cached'] else record['result'].get('reports', [])
    if not reports:
      continue
    trial = types.SimpleNamespace(trial_id=f'journal-{record["trial"]}')
    scheduler.on_trial_add(None, trial)
    for report in reports:
      scheduler.on_trial_result(None, trial, {TIME_ATTR: report['steps'],
                                              METRIC: reward_fn(report)})
    scheduler.on_trial_remove(None, trial)
    replayed += 1
  return replayed
