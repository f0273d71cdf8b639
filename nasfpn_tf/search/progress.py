"""What a search shows while it runs: a progress line per sample, and the files people look at.

- a line per sample: trial, reward (and the step where ASHA stopped it), best so far,
  unique/total samples, samples per hour, ETA;
- `best.gin` each time the best reward of a trial that trained to the end (`trained_to_the_end`:
  ASHA did not stop it) improves: a `build_retinanet.block_specs` binding that
  trains the architecture as is (`--gin_file=demo.gin --gin_file=DIR/best.gin`), behind its
  fixed tables with `--pyramids` (`build_retinanet.pyramids` and `.num_repeats`);
- `architectures/`: a drawing of each new best (paper Fig. 7; with `--pyramids`, the stack);
- a NAS-FCOS space's best.gin and drawing: FCOS with the sampled pyramid, or the sampled head on
  the space's fixed pyramid (drawn, the head's key in the title);
  `--gin_file=fcos_demo.gin --gin_file=DIR/best.gin`;
- `search_progress.png`: the paper's Fig. 5, reward over samples and unique against total.
"""
import pathlib
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search import space as space_lib
from nasfpn_tf.utils.files import atomic_write
from nasfpn_tf.visualization.architecture import draw_pyramids, draw_spec
from nasfpn_tf.visualization.nasfcos_architecture import draw_nasfcos_spec

# Samples between redraws of search_progress.png (it is also drawn at each new best and at the end).
REDRAW_EVERY = 25


def _duration(seconds: float) -> str:
  minutes = int(round(seconds / 60))
  return f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m'


def _binding(name: str, value) -> str:
  """A `build_retinanet.<name>` gin binding; a list of rows (block specs) a row a line."""
  if isinstance(value, list) and value and isinstance(value[0], (list, tuple)):
    rows = ',\n    '.join(repr(row) for row in value)
    return f'build_retinanet.{name} = [\n    {rows},\n]'
  return f'build_retinanet.{name} = {value!r}'


def block_specs_binding(block_specs) -> str:
  """The `build_retinanet.block_specs = [...]` gin binding of a table (rows or BlockSpecs)."""
  return _binding('block_specs', specs_lib.to_config(specs_lib.resolve(block_specs)))


# In `--pyramids` (`SearchSettings.pyramids`), the repeats that build the sampled table; the
# others are fixed tables (names of `block_specs.SPECS`), e.g. ('fpn', 'searched', 'searched').
SEARCHED = 'searched'


def pyramid_bindings(pyramids: Optional[Sequence[str]]) -> List[str]:
  """The gin bindings that stack each sample behind `pyramids`' fixed tables (empty for None):
  `build_retinanet.pyramids` with None for each searched repeat (None builds
  `build_retinanet.block_specs`, the sample) and `build_retinanet.num_repeats`."""
  if not pyramids:
    return []
  entries = [None if entry == SEARCHED else entry for entry in pyramids]
  return [f'build_retinanet.pyramids = {entries!r}',
          f'build_retinanet.num_repeats = {len(entries)}']


def trial_number(record: Dict[str, Any]) -> int:
  """The number people read for a journal line: its 0-based `trial`, counted from 1."""
  return record['trial'] + 1


def best_gin(record: Dict[str, Any], space_config: Dict[str, Any]) -> str:
  """The gin text that trains the architecture of `record` (a journal line of a search in the
  space of `space_config`): NAS-FPN's levels and table (behind its --pyramids), or FCOS with a
  NAS-FCOS space's `model_arguments` (its pyramid, or its head on the fixed pyramid)."""
  space = space_lib.from_config(space_config)
  header = (f"# Best architecture of the search so far: trial {trial_number(record)}, reward "
            f"{record['reward']:.4f}.\n# key {record['key']}\n")
  if space.NAME != space_lib.SearchSpace.NAME:
    arguments = {'detector': space.DETECTOR, **space.model_arguments(record['block_specs'])}
    return header + ''.join(_binding(name, value) + '\n' for name, value in arguments.items())
  return (header + f"build_retinanet.min_level = {space.min_level}\n"
          f"build_retinanet.max_level = {space.max_level}\n"
          f"{block_specs_binding(record['block_specs'])}\n"
          + ''.join(f'{line}\n' for line in pyramid_bindings(record.get('pyramids'))))


def trained_to_the_end(record: Dict[str, Any]) -> bool:
  """Whether a journal line's architecture trained to the end (ASHA did not stop it): only those
  can be the search's best, since a reward measured earlier in a training is not comparable."""
  return record.get('stopped_at_step') is None


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
  """Mean of the last `window` values at each sample (fewer at the start)."""
  values = np.asarray(values, dtype=float)
  sums = np.cumsum(np.concatenate([[0.0], values]))
  starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
  return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def draw_search_progress(records: Sequence[Dict[str, Any]], path: str, title: str) -> None:
  """Fig. 5 of the paper: reward per sample with its moving average; unique vs total samples."""
  rewards = [record['reward'] for record in records]
  samples = np.arange(1, len(records) + 1)
  seen, unique = set(), []
  for record in records:
    seen.add(record['key'])
    unique.append(len(seen))
  fig = Figure(figsize=(10, 4))
  reward_ax, unique_ax = fig.subplots(1, 2)
  reward_ax.scatter(samples, rewards, s=6, color='#90a4ae', label='sample')
  window = max(1, len(records) // 20)
  reward_ax.plot(samples, moving_average(rewards, window), color='#e53935',
                 label=f'moving average ({window})')
  # The best of the trials that trained to the end (ASHA's stopped ones are not comparable).
  best = np.maximum.accumulate([r['reward'] if trained_to_the_end(r) else -np.inf
                                for r in records])
  reward_ax.plot(samples, np.where(np.isinf(best), np.nan, best), color='#1e88e5',
                 label='best so far')
  reward_ax.set(xlabel='sample', ylabel='reward', title='Reward')
  reward_ax.legend(fontsize=8)
  unique_ax.plot(samples, unique, color='#43a047', label='unique architectures')
  unique_ax.plot(samples, samples, color='#bdbdbd', ls='--', label='all unique')
  unique_ax.set(xlabel='total samples', ylabel='unique samples', title='Unique architectures')
  unique_ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)


class Progress:
  """Follows the journal: prints a line per sample and writes best.gin and the pictures."""

  def __init__(self, settings, records: List[Dict[str, Any]], log):
    self.settings = settings
    self.directory = pathlib.Path(settings.search_dir)
    self.records = records  # the searcher's list, which grows as samples finish
    self.log = log
    self.started = time.time()
    self.first_record = len(records)
    full = [r for r in records if trained_to_the_end(r)]
    self.best = max(full, key=lambda r: r['reward']) if full else None
    if records:
      log(f'Resuming {self.directory}: {len(records)} samples done, '
          f'{len({r["key"] for r in records})} unique, {self._best_text("best reward")}.')

  def _best_text(self, label: str = 'best') -> str:
    if self.best is None:
      return f'{label}: no trial trained to the end yet'
    return f'{label} {self.best["reward"]:.4f} (trial {trial_number(self.best)})'

  def update(self, record: Dict[str, Any]) -> None:
    improved = trained_to_the_end(record) and (
        self.best is None or record['reward'] > self.best['reward'])
    if improved:
      self.best = record
      self._write_best()
    if improved or len(self.records) % REDRAW_EVERY == 0:
      self.draw()
    self.log(self._line(record))

  def _line(self, record: Dict[str, Any]) -> str:
    done = len(self.records) - self.first_record
    hours = (time.time() - self.started) / 3600
    rate = done / hours if hours > 0 else float('inf')
    remaining = self.settings.num_trials - len(self.records)
    eta = _duration(remaining / rate * 3600) if rate > 0 else '?'
    how = 'cached' if record['cached'] else f"{record['seconds']:.0f} s"
    if record.get('stopped_at_step') is not None:
      how += f", stopped at step {record['stopped_at_step']}"
    return (f"trial {trial_number(record)}/{self.settings.num_trials} | reward "
            f"{record['reward']:.4f} ({how}) | {self._best_text()} | unique "
            f"{len({r['key'] for r in self.records})}/"
            f"{len(self.records)} | {rate:.0f} samples/h | ETA {eta}")

  def _write_best(self) -> None:
    space = self.settings.space
    atomic_write(self.directory / search_dir_lib.BEST_GIN, best_gin(self.best, space.config()))
    drawing = (self.directory / search_dir_lib.ARCHITECTURES_DIR /
               f"trial{trial_number(self.best):05d}_reward{self.best['reward']:.4f}.png")
    drawing.parent.mkdir(parents=True, exist_ok=True)
    title = f"best after {trial_number(self.best)} samples: reward {self.best['reward']:.4f}"
    if space.NAME != space_lib.SearchSpace.NAME:  # NAS-FCOS: a head search draws its pyramid
      pyramid = getattr(space, 'pyramid', self.best['block_specs'])
      if pyramid is not self.best['block_specs']:
        title += f"\nhead {self.best['key']}"
      draw_nasfcos_spec(pyramid, str(drawing), title=title)
      return
    specs = specs_lib.resolve(self.best['block_specs'])
    if self.best.get('pyramids'):  # the sample behind its fixed tables, one panel per repeat
      draw_pyramids([None if entry == SEARCHED else entry for entry in self.best['pyramids']],
                    space.min_level, space.max_level, str(drawing), block_specs=specs,
                    title=title)
    else:
      draw_spec(specs, space.min_level, space.max_level, str(drawing), title=title)

  def draw(self) -> None:
    if self.records:
      draw_search_progress(
          self.records, str(self.directory / search_dir_lib.PROGRESS_PNG),
          f'{self.settings.algorithm} search, {self.settings.proxy} proxy, '
          f'{len(self.records)} samples')

  def summary(self, wall_seconds: float) -> Dict[str, Any]:
    self.draw()
    return {
        'num_trials': len(self.records),
        'num_unique': len({r['key'] for r in self.records}),
        'best_reward': self.best['reward'] if self.best else None,
        'best_key': self.best['key'] if self.best else None,
        'num_stopped_early': sum(r.get('stopped_at_step') is not None for r in self.records),
        'wall_seconds': round(wall_seconds, 1)}
