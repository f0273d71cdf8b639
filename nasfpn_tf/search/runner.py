"""The search loop: a controller behind a Ray Tune `Searcher`, its samples in a journal.

The search dir is the whole state of a search:
- `search.json`: what the search is (`SearchSettings.IDENTITY`: the space (its --space name and
  fields: NAS-FPN's, NAS-FCOS's pyramid or head space, the head's fixed pyramid), algorithm,
  proxy, reward, seed, data_dir, backbone checkpoint, proxy seeds ...); a rerun with other
  settings is refused, naming the one that differs (a setting newer than the file counts at its
  default).
- `trials.jsonl` (`Journal`): one line per finished sample, the source of truth. The controller's
  state (`controller.pkl`) is saved after each line with the number of lines it has seen; on a
  restart the lines it missed are fed back to it again, so kill -9 anywhere loses nothing.
- `results/` (`ResultStore`): the result of each trained key, written by the worker.
- `best.gin`, `search_progress.png`, `architectures/`: what people look at.

Duplicates: the paper counts every sample, so each one is a journal line and a feedback to the
controller, but a key is trained once. A known key is answered from `results/` without a trial; a
key in training is answered when its trial finishes.

Early stopping (`--scheduler=asha`, `schedulers`): a trial that ASHA stops is a sample like any
other: its journal line holds the result it last reported (`stopped_at_step`: the step, None for
a trial that trained to the end), the controller learns that result's reward, and its key is
stored in `results/` like a trained one, so that duplicates are answered from it.
"""
import collections
import dataclasses
import json
import os
import pathlib
import pickle
import socket
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gin

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search import controllers as controllers_lib
from nasfpn_tf.search import progress as progress_lib
from nasfpn_tf.search import rewards as rewards_lib
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search import schedulers
from nasfpn_tf.search.journal import Journal, ResultStore
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search.trials import PROXIES, SYNTHETIC_STEPS, train_architecture
from nasfpn_tf.utils.files import atomic_write


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  """What a search is. The fields in `IDENTITY` must match when a search dir is resumed."""
  search_dir: str
  algorithm: str = 'ppo'
  num_trials: int = 100
  proxy: str = 'cpu'
  reward: str = 'ap'
  target_flops: Optional[float] = None
  space: Any = SearchSpace()  # any space of `space.spaces()`
  seed: int = 0
  init_block_specs: Optional[str] = None
  gin_bindings: Sequence[str] = ()
  data_dir: Optional[str] = None  # cpu: the user's converter records; paper: its split records
  backbone_checkpoint: Optional[str] = None  # cpu: the frozen backbone (default: pretrained)
  proxy_seeds: int = 1  # trainings per architecture (seeds seed..), rewarded their mean
  proxy_dir: Optional[str] = None  # what trials share (the CPU proxy's cache); default DIR/proxy
  cpus_per_trial: float = 1  # a trial per core at once (docs/search.md: more samples/h)
  gpus_per_trial: float = 0
  max_failures: int = 2
  ray_address: Optional[str] = None
  synthetic_seconds: float = 0.0
  scheduler: str = 'none'  # or 'asha': early stopping of weak trials (`schedulers`)
  asha_grace_period: Optional[int] = None  # default: ceil(train steps / factor^2)
  asha_reduction_factor: Optional[float] = None  # default: schedulers.DEFAULT_REDUCTION_FACTOR
  report_every: int = 0  # steps between a trial's reports under ASHA; 0: at the rungs only
  # Per-repeat tables, e.g. ('fpn', 'searched', 'searched'): each sample stacked behind fixed
  # tables (names of block_specs.SPECS) in the 'searched' repeats (`progress.pyramid_bindings`).
  pyramids: Optional[Tuple[str, ...]] = None

  IDENTITY = ('algorithm', 'proxy', 'reward', 'target_flops', 'space', 'seed',
              'init_block_specs', 'gin_bindings', 'data_dir', 'backbone_checkpoint',
              'proxy_seeds', 'scheduler', 'asha_grace_period', 'asha_reduction_factor',
              'report_every', 'pyramids')

  def identity(self) -> Dict[str, Any]:
    identity = {name: getattr(self, name) for name in self.IDENTITY}
    identity['space'] = self.space.config()
    identity['space_name'] = self.space.NAME  # --space, named apart for a plain refusal
    identity['gin_bindings'] = list(self.gin_bindings)
    identity['pyramids'] = list(self.pyramids) if self.pyramids else None
    return identity

  def trial_gin_bindings(self) -> List[str]:
    """The proxy's bindings: `gin_bindings`, then those of `pyramids`."""
    return list(self.gin_bindings) + progress_lib.pyramid_bindings(self.pyramids)


def check_pyramids(settings: SearchSettings) -> None:
  """--pyramids: 'searched' or a table that builds the space's levels in each entry, at least
  one 'searched', and no --gin_bindings of its own bindings; ValueError naming the flag."""
  pyramids = settings.pyramids
  if not pyramids:
    return
  where = f'--pyramids={",".join(pyramids)}'
  if not isinstance(settings.space, SearchSpace):
    raise ValueError(f'{where} stacks samples of the NAS-FPN space (block specs), not of '
                     f'{type(settings.space).__name__}.')
  if progress_lib.SEARCHED not in pyramids:
    raise ValueError(f'{where}: no entry is {progress_lib.SEARCHED!r}, so nothing of the '
                     'network is searched; name the repeats that build the sample.')
  space = settings.space
  for i, entry in enumerate(pyramids):
    if entry == progress_lib.SEARCHED:
      continue
    try:
      specs_lib.validate(specs_lib.resolve(entry, space.min_level, space.max_level),
                         space.min_level, space.max_level)
    except ValueError as e:
      raise ValueError(f'{where}: entry {i} {entry!r} is neither {progress_lib.SEARCHED!r} nor '
                       f'a table of levels {space.min_level}..{space.max_level}: {e}') from e
  for binding in settings.gin_bindings:
    name = binding.split('=')[0].strip()
    if name in ('build_retinanet.pyramids', 'build_retinanet.num_repeats'):
      raise ValueError(f'--gin_bindings="{binding}" and {where} both set {name}: --pyramids '
                       'binds it (num_repeats: one per entry).')


def check_search_dir(settings: SearchSettings, record: bool = True) -> None:
  """Refuses a search dir that holds another search; with `record`, writes `search.json` in a
  new one (`search_dir.check_identity`; a setting newer than the file counts at its default)."""
  defaults = {f.name: f.default for f in dataclasses.fields(SearchSettings)}
  defaults['space_name'] = SearchSpace.NAME  # dirs from before --space searched NAS-FPN
  search_dir_lib.check_identity(settings.search_dir, settings.identity(), record, defaults)


class ControllerSearcher:
  """Proposes samples, answers duplicates, journals results and keeps the controller's state.

  Plain Python; `TuneSearcher` adapts it to Ray Tune, and tests drive it directly.
  """

  def __init__(self, settings: SearchSettings, log=print,
               asha: Optional[schedulers.Asha] = None):
    """asha: the resolved `--scheduler=asha` settings (None: every trial trains to the end)."""
    self.settings = settings
    self.asha = asha
    self.directory = pathlib.Path(settings.search_dir)
    self.journal = Journal(self.directory / search_dir_lib.TRIALS_FILE)
    self.results = ResultStore(self.directory / search_dir_lib.RESULTS_DIR)
    self.log = log
    self.controller = controllers_lib.make_controller(
        settings.algorithm, settings.space, seed=settings.seed,
        init_block_specs=settings.init_block_specs)
    self.records = self.journal.recover()
    self._restore_controller()
    self.progress = progress_lib.Progress(settings, self.records, log)
    self.in_flight = {}  # trial id -> Proposal
    self.waiting = collections.defaultdict(list)  # key in training -> its duplicate Proposals
    self.failed: List[str] = []

  # State.

  def _state_path(self) -> pathlib.Path:
    return self.directory / search_dir_lib.CONTROLLER_FILE

  def _restore_controller(self) -> None:
    """Loads the saved state, then feeds back the journal lines it had not seen."""
    seen = 0
    if self._state_path().exists():
      saved = pickle.loads(self._state_path().read_bytes())
      self.controller.load_state(saved['state'])
      seen = saved['num_records']
    for record in self.records[seen:]:
      self.controller.feedback(_proposal(record, self.settings.space), record['reward'])
    if seen < len(self.records):
      self._save_controller()

  def _save_controller(self) -> None:
    state = {'state': self.controller.state(), 'num_records': len(self.records)}
    atomic_write(self._state_path(), pickle.dumps(state))

  # The loop.

  @property
  def num_issued(self) -> int:
    """Samples finished or under way: the budget counts both."""
    return (len(self.records) + len(self.in_flight)
            + sum(len(waiting) for waiting in self.waiting.values()))

  @property
  def finished(self) -> bool:
    return bool(self.failed) or self.num_issued >= self.settings.num_trials

  def suggest(self, trial_id: str) -> Optional[Dict[str, Any]]:
    """A trial config for a key to train, or None when the budget is spent or a trial failed.

    Duplicates of trained keys are recorded on the spot, duplicates of keys in training wait for
    their trial; either way they count as samples, and the controller proposes again.
    """
    while not self.finished:
      proposal = self.controller.propose()
      known = self.results.get(proposal.key)
      if known is not None:
        self._record(proposal, known, seconds=0.0, cached=True)
      elif self._in_training(proposal.key):
        self.waiting[proposal.key].append(proposal)
      else:
        self.in_flight[trial_id] = proposal
        return self._trial_config(proposal)
    return None

  def _in_training(self, key: str) -> bool:
    return any(proposal.key == key for proposal in self.in_flight.values())

  def complete(self, trial_id: str, metrics: Optional[Dict[str, Any]], error: bool) -> None:
    """Records a finished trial and the duplicates that waited for it."""
    proposal = self.in_flight.pop(trial_id)
    if error or not metrics or 'result_json' not in metrics:
      self.failed.append(trial_id)
      self.log(f'trial {trial_id} ({proposal.key}) failed after {self.settings.max_failures} '
               f'retries; the search stops (its log is under {search_dir_lib.RAY_RESULTS_DIR}/ in '
               'the search dir).')
      return
    result = json.loads(metrics['result_json'])
    if not metrics.get('final', True):  # ASHA stopped it after this report
      result['stopped_at_step'] = int(metrics['step'])
      self.results.put(proposal.key, result)
    self._record(proposal, result, seconds=metrics['seconds'], cached=metrics['reused'],
                 node_id=metrics.get('node_id'))
    for duplicate in self.waiting.pop(proposal.key, []):
      self._record(duplicate, result, seconds=0.0, cached=True)

  def _record(self, proposal, result: Dict[str, Any], seconds: float, cached: bool,
              node_id: Optional[str] = None) -> None:
    reward = rewards_lib.reward(result, kind=self.settings.reward,
                                target_flops=self.settings.target_flops)
    record = {
        'trial': len(self.records), 'key': proposal.key,
        'block_specs': self.settings.space.spec_config(proposal.block_specs), 'reward': reward,
        'seconds': seconds, 'cached': cached, 'result': result, 'node_id': node_id,
        'stopped_at_step': result.get('stopped_at_step'),
        'actions': list(proposal.actions), 'log_probs': list(proposal.log_probs),
        'proposal_index': proposal.index}
    if self.settings.pyramids:  # the fixed tables the sample was trained behind
      record['pyramids'] = list(self.settings.pyramids)
    self.journal.append(record)
    self.records.append(record)
    self.controller.feedback(proposal, reward)
    self._save_controller()
    self.progress.update(record)

  def _trial_config(self, proposal) -> Dict[str, Any]:
    s = self.settings
    return {
        'key': proposal.key, 'block_specs': s.space.spec_config(proposal.block_specs),
        'space': s.space.config(), 'proxy': s.proxy, 'seed': s.seed,
        'gin_bindings': s.trial_gin_bindings(), 'data_dir': s.data_dir,
        'backbone_checkpoint': s.backbone_checkpoint, 'proxy_seeds': s.proxy_seeds,
        'cpus_per_trial': s.cpus_per_trial, 'synthetic_seconds': s.synthetic_seconds,
        'results_dir': str((self.directory / search_dir_lib.RESULTS_DIR).resolve()),
        'work_dir': proxy_dir(s), **self._report_config()}

  def _report_config(self) -> Dict[str, Any]:
    """What a trial needs to report to ASHA: the steps, its length, how to compute the reward."""
    if self.asha is None:
      return {}
    reward = {'kind': self.settings.reward, 'target_flops': self.settings.target_flops}
    try:  # the driver's gin binding, so that ASHA compares the rewards the journal records
      reward['flops_weight'] = gin.query_parameter('reward.flops_weight')
    except ValueError:
      pass  # unbound: the worker's default is the same
    return {'report_steps': self.asha.report_steps(), 'max_steps': self.asha.max_t,
            'reward': reward}


def proxy_dir(settings: SearchSettings) -> str:
  """Where the trials' shared proxy files live (absolute: workers run elsewhere)."""
  default = pathlib.Path(settings.search_dir, search_dir_lib.PROXY_DIR)
  return str(pathlib.Path(settings.proxy_dir or default).resolve())


def _proposal(record: Dict[str, Any], space) -> controllers_lib.Proposal:
  """The proposal a journal line of a search in `space` records, to feed back again after a
  restart."""
  return controllers_lib.Proposal(
      block_specs=space.decode(record['actions']), key=record['key'],
      actions=tuple(record['actions']), log_probs=tuple(record['log_probs']),
      index=record['proposal_index'])


def _tune_searcher(searcher: ControllerSearcher):
  """`searcher` behind Ray Tune's Searcher API."""
  from ray.tune.search import Searcher  # pylint: disable=g-import-not-at-top

  class TuneSearcher(Searcher):

    # No closure over `searcher`: Tune pickles this class by value (see __getstate__).
    def __init__(self, controller_searcher: ControllerSearcher):
      super().__init__()  # no metric: rewards are computed and kept by the ControllerSearcher
      # Not `.searcher`: Tune takes a searcher with that attribute for a wrapper of another.
      self._search = controller_searcher

    def suggest(self, trial_id):
      config = self._search.suggest(trial_id)
      return Searcher.FINISHED if config is None else config

    def on_trial_complete(self, trial_id, result=None, error=False):
      self._search.complete(trial_id, result, error)

    def __getstate__(self):
      """Tune pickles its searcher for `Tuner.restore`, which a search does not use (its state is
      the search dir), and a PPO controller holds TensorFlow objects that do not pickle."""
      state = dict(self.__dict__)
      state.pop('_search', None)
      return state

    def save(self, checkpoint_path):
      """Nothing for Tune to keep: the state lives in the search dir."""

    def restore(self, checkpoint_path):
      """A resumed search restores from the search dir, not from Tune."""

  return TuneSearcher(searcher)


def run_search(settings: SearchSettings, log=print) -> Dict[str, Any]:
  """Runs (or resumes) the search in `settings.search_dir`; returns the final summary."""
  if settings.proxy not in PROXIES:
    raise ValueError(f'--proxy={settings.proxy!r} is not one of {list(PROXIES)}.')
  if settings.algorithm not in controllers_lib.CONTROLLERS:
    raise ValueError(f'--algorithm={settings.algorithm!r} is not one of '
                     f'{sorted(controllers_lib.CONTROLLERS)}.')
  if settings.init_block_specs is not None:
    try:
      settings.space.encode(settings.init_block_specs)
    except ValueError as e:
      raise ValueError(f'--init_block_specs={settings.init_block_specs!r} is not in '
                       f'{settings.space!r}: {e}') from e
  check_pyramids(settings)
  rewards_lib.check(settings.reward, settings.target_flops, settings.proxy)
  if settings.proxy_seeds < 1:
    raise ValueError(f'--proxy_seeds must be >= 1, got {settings.proxy_seeds}.')
  schedulers.check_name(settings.scheduler, settings.asha_grace_period,
                        settings.asha_reduction_factor, settings.report_every, settings.proxy,
                        settings.proxy_seeds)
  check_search_dir(settings, record=False)
  started = time.time()
  if settings.proxy != 'synthetic':
    # What the trials share (the CPU proxy's cache), built here once rather than by the first
    # trials at the same time; it also parses the proxy's gin, so bindings that do not build
    # fail before the search dir records them.
    from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top
    proxy.prepare(settings.proxy, proxy_dir(settings), settings.trial_gin_bindings(),
                  data_dir=settings.data_dir, backbone_checkpoint=settings.backbone_checkpoint,
                  space=settings.space)
  asha = resolve_asha(settings)
  check_search_dir(settings)
  searcher = ControllerSearcher(settings, log, asha)
  if not searcher.finished:
    _run_trials_on_ray(settings, searcher)
  if searcher.failed:
    raise RuntimeError(f'{len(searcher.failed)} trial(s) failed: {searcher.failed}; the search '
                       f'dir {settings.search_dir} keeps every finished one, rerun to go on.')
  return searcher.progress.summary(wall_seconds=time.time() - started)


def resolve_asha(settings: SearchSettings) -> Optional[schedulers.Asha]:
  """The search's ASHA settings against its proxy's train steps (the CPU proxy's from the gin
  config that `proxy.prepare` parsed), or None without --scheduler=asha."""
  if settings.scheduler == 'none':
    return schedulers.resolve('none', 0, '', settings.asha_grace_period,
                              settings.asha_reduction_factor, settings.report_every)
  if settings.proxy == 'synthetic':
    steps, name = SYNTHETIC_STEPS, 'the synthetic proxy\'s trials.SYNTHETIC_STEPS'
  else:
    from nasfpn_tf.search import cpu_proxy  # pylint: disable=g-import-not-at-top
    steps, name = cpu_proxy.CpuProxy().train_steps, 'CpuProxy.train_steps'
  return schedulers.resolve(settings.scheduler, steps, name, settings.asha_grace_period,
                            settings.asha_reduction_factor, settings.report_every)


def check_reachable(address: str, timeout: float = 10.0) -> None:
  """Raises ValueError naming `address` (host:port) when nothing listens there: ray.init would
  wait minutes before it gives up."""
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--ray_address={address!r} is not host:port (or auto).')
  try:
    socket.create_connection((host, int(port)), timeout=timeout).close()
  except OSError as e:
    raise ValueError(f'--ray_address={address!r}: no Ray cluster answers there ({e}).') from e


def _run_trials_on_ray(settings: SearchSettings, searcher: ControllerSearcher) -> None:
  # Tune's own tables would bury the search's progress lines.
  os.environ.setdefault('RAY_AIR_NEW_OUTPUT', '0')
  # Ray starts its workers at niceness 15, below every other process: a trial, the search's
  # work, then all but stops while anything else runs on the machine. The workers of a Ray this
  # search starts run at the priority of the rest (Ray's RayConfig worker_niceness; a cluster
  # joined with --ray_address keeps its own).
  os.environ.setdefault('RAY_worker_niceness', '0')
  import ray  # pylint: disable=g-import-not-at-top
  from ray import tune  # pylint: disable=g-import-not-at-top
  if settings.ray_address not in (None, 'auto'):
    check_reachable(settings.ray_address)
  try:
    # 'local' starts a Ray of our own: address=None would join whatever cluster this machine
    # last started, even a dead one.
    ray.init(address=settings.ray_address or 'local', include_dashboard=False,
             log_to_driver=False, configure_logging=False)
  except Exception as e:  # Ray raises several types (connection, authentication).
    raise ValueError(f'--ray_address={settings.ray_address!r}: could not join the Ray cluster '
                     f'there: {e}') from e
  try:
    runs = pathlib.Path(settings.search_dir, search_dir_lib.RAY_RESULTS_DIR).resolve()
    trainable = tune.with_resources(
        train_architecture, {'cpu': settings.cpus_per_trial, 'gpu': settings.gpus_per_trial})
    scheduler = None
    if searcher.asha is not None:
      scheduler = schedulers.make_scheduler(searcher.asha)
      replayed = schedulers.replay(scheduler, searcher.records, lambda report: rewards_lib.reward(
          report, kind=settings.reward, target_flops=settings.target_flops))
      asha = searcher.asha
      searcher.log(f'ASHA: rungs at steps {", ".join(f"{m:g}" for m in asha.rungs())} of '
                   f'{asha.max_t}, reduction factor {asha.reduction_factor:g}, reports at steps '
                   f'{", ".join(map(str, asha.report_steps()))}'
                   + (f'; {replayed} trials of the journal replayed into its rungs.'
                      if replayed else '.'))
    tune.Tuner(
        trainable,
        # reuse_actors: a worker process runs trial after trial (the trainable is a plain call
        # and the proxy clears its session per trial), so only the first pays for its start and
        # its imports (TensorFlow for a training proxy); see experiments/trial_overhead.py.
        tune_config=tune.TuneConfig(search_alg=_tune_searcher(searcher), num_samples=-1,
                                    reuse_actors=True, scheduler=scheduler,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            storage_path=str(runs), name=f'run{len(list(runs.glob("run*"))) if runs.exists() else 0}',
            verbose=0, failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
    ).fit()
  finally:
    ray.shutdown()
