"""The table of one configuration's result (Markdown, the format of docs/benchmark.md)."""
from typing import List, Optional

from bench.op_profile import PROFILE_CATEGORIES, PROFILE_LABELS
from bench.rows import ConfigResult, Timing


def fmt(value: Optional[float]) -> str:
  """Seconds as '64 ms' or '1.39 s'; '-' where not measured."""
  if value is None:
    return '-'
  return f'{value * 1000:.0f} ms' if value < 1 else f'{value:.2f} s'


def _median(timing: Optional[Timing]) -> Optional[float]:
  return None if timing is None else timing.median


def _first(timing: Optional[Timing]) -> Optional[float]:
  return None if timing is None else timing.first


def _measure_rows(result: ConfigResult) -> List[str]:
  """The rows 'measure | ours | TFM | ours / TFM [| ours bfloat16]' (bfloat16: end to end and
  network only; '-' where not measured)."""
  lines = []

  def add(label, ours, theirs, bf16_cell=''):
    cells = [label, fmt(ours), fmt(theirs), f'{ours / theirs:.3f}']
    if result.bf16:
      cells.append(bf16_cell)
    lines.append('| ' + ' | '.join(cells) + ' |')

  inference = result.inference
  if inference is not None:
    for batch in (1, 8):
      sides = inference.e2e[batch]
      add(f'end-to-end latency, batch {batch} (float32)', sides['ours'].median,
          sides['theirs'].median, fmt(_median(sides.get('ours_bf16'))))
    network = inference.network
    add('network only, batch 1 (float32)', network['ours'].median, network['theirs'].median,
        fmt(_median(network.get('ours_bf16'))))
    b1 = inference.e2e[1]
    add('first call (trace + run), batch 1', b1['ours'].first, b1['theirs'].first,
        fmt(_first(b1.get('ours_bf16'))))
    add('post-processing alone, all candidates pass, b1', inference.postprocess_worst['ours'],
        inference.postprocess_worst['theirs'])
  training = result.training
  if training is not None:
    for suffix, precision in (('fp32', 'float32'), ('bf16', 'bfloat16')):
      if suffix in training.suffixes:
        add(f'train step, batch {training.batch}, {precision}',
            training.steps[f'ours_{suffix}'].median, training.steps[f'theirs_{suffix}'].median)
  return lines


def _profile_lines(result: ConfigResult) -> List[str]:
  training = result.training
  profile = training.profile
  names = list(profile)
  lines = ['', 'train step by op type, seconds per step (TF profiler, one inter-op thread):',
           '| op type | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
  rows = [(PROFILE_LABELS[c], [profile[n][c] for n in names]) for c in PROFILE_CATEGORIES]
  rows.append(('total', [sum(profile[n].values()) for n in names]))
  lines += [f'| {label} | ' + ' | '.join(f'{v:.3f}' for v in values) + ' |'
            for label, values in rows]
  lines.append('ours / TFM if everything but our convolutions and batch norms took no time: ' +
               ', '.join(f'{s} {training.ratio_bound(s):.3f}' for s in training.suffixes))
  return lines


def table(result: ConfigResult) -> str:
  bf16 = result.bf16
  lines = [f'\n### {result.config}: {result.label}, {result.params:,} params '
           f'(load {result.load_avg_start:.1f} -> {result.load_avg_end:.1f})',
           f'raw outputs, ours float32 vs TFM float32: max |diff| = '
           f'{result.network_max_abs_diff:.3g}' + (
               f' (ours bfloat16: {result.network_max_abs_diff_bf16:.3g})' if bf16 else ''), '',
           '| measure | ours | TFM | ours / TFM |' + (' ours bfloat16 |' if bf16 else ''),
           '|---|---:|---:|---:|' + ('---:|' if bf16 else '')]
  lines += _measure_rows(result)
  lines.append('')
  inference, training = result.inference, result.training
  if inference is not None:
    lines.append(f'post-processing share of our end-to-end time: '
                 f'{inference.postprocess_share("ours"):.1%} '
                 f'(all candidates passing: {inference.postprocess_share_worst:.1%}); TFM: '
                 f'{inference.postprocess_share("theirs"):.1%}')
    if 'ours_xla' in inference.network:
      lines.append(f'ours network with XLA: {fmt(inference.network["ours_xla"].median)}')
  if training is not None:
    if bf16:
      lines.append(f'train step, ours bfloat16 / TFM float32 (as its factory builds it): '
                   f'{training.ratio_vs_tfm_fp32:.3f}')
    lines.append('train step (images/s; loss after the same steps): ' + ', '.join(
        f'{n} {fmt(s.median)} ({training.batch / s.median:.2f}/s; {s.loss:.4f})'
        for n, s in training.steps.items()))
    if training.profile is not None:
      lines += _profile_lines(result)
  if result.memory is not None:
    memory = result.memory
    lines.append('peak RSS: ' + ', '.join(
        f'{kind} ours {sides["ours"]:.0f} MB / TFM {sides["theirs"]:.0f} MB = '
        f'{memory.ratio(kind):.2f}' for kind, sides in memory.peak_rss_mb.items()))
  if result.ap is not None:
    ap = result.ap
    bf16_ap = (f'; ours bfloat16 {ap.ap["ours_bf16"]:.4f} (identical detections on '
               f'{ap.identical["ours_bf16"]:.0%} of images)' if 'ours_bf16' in ap.ap else '')
    lines.append(f'COCO AP ({ap.images} images; {ap.model}): ours {ap.ap["ours"]:.4f}, '
                 f'TFM {ap.ap["theirs"]:.4f}, diff {ap.diff:+.4f}, identical detections on '
                 f'{ap.identical["ours"]:.0%} of images{bf16_ap}')
  return '\n'.join(lines)


def print_table(result: ConfigResult) -> None:
  print(table(result), flush=True)
