"""Typed results of one configuration, and their JSON form: one flat object whose keys name the
measure, the batch and the side (`e2e_s_b1_ours`, `train_step_s_theirs_bf16`, ...).

Sides: 'ours' and 'theirs' (TF Model Garden) in float32, 'ours_bf16' (ours in bfloat16, where
that runs natively), 'ours_xla' (network with XLA). Train-step variants: '<side>_<fp32|bf16>',
and 'ours_fp32_xla'.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

SUFFIX = {'float32': 'fp32', 'bfloat16': 'bf16'}


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds of one timed call: the first (trace + run), the median and min of the repeats."""
  first: float
  median: float
  min: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Inference:
  """Latency: end to end by batch then side, network only at batch 1 by side, and the
  post-processing alone with every candidate above the threshold (median s, ours and theirs)."""
  e2e: Mapping[int, Mapping[str, Timing]]
  network: Mapping[str, Timing]
  postprocess_worst: Mapping[str, float]

  def e2e_ratio(self, batch: int) -> float:
    return self.e2e[batch]['ours'].median / self.e2e[batch]['theirs'].median

  @property
  def network_ratio(self) -> float:
    return self.network['ours'].median / self.network['theirs'].median

  def postprocess_share(self, side: str) -> float:
    """The share of `side`'s end-to-end time at batch 1 not spent in the network."""
    e2e = self.e2e[1][side].median
    return max(0.0, (e2e - self.network[side].median) / e2e)

  @property
  def postprocess_share_worst(self) -> float:
    ours = self.postprocess_worst['ours']
    return ours / (ours + self.network['ours'].median)

  def to_json(self) -> Dict[str, Any]:
    row = {}
    for batch, sides in self.e2e.items():
      for side, timing in sides.items():
        row[f'e2e_s_b{batch}_{side}'] = timing.median
        row[f'e2e_first_call_s_b{batch}_{side}'] = timing.first
    for side, timing in self.network.items():
      row[f'network_s_b1_{side}'] = timing.median
      row[f'network_first_call_s_b1_{side}'] = timing.first
    row.update({
        'e2e_latency_ratio_b1': self.e2e_ratio(1), 'e2e_latency_ratio_b8': self.e2e_ratio(8),
        'network_latency_ratio': self.network_ratio,
        'postprocess_share': self.postprocess_share('ours'),
        'postprocess_share_theirs': self.postprocess_share('theirs'),
        'postprocess_worst_s_ours': self.postprocess_worst['ours'],
        'postprocess_worst_s_theirs': self.postprocess_worst['theirs'],
        'postprocess_share_worst': self.postprocess_share_worst})
    return row


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """One train-step variant: first step and median step (s), and the loss after the steps."""
  first: float
  median: float
  loss: float


@dataclasses.dataclass(frozen=True)
class Training:
  """Train steps at `batch` by variant, all from the same weights on the same batch; `profile`:
  {variant: {op category: seconds per step}} with --profile_train_step."""
  batch: int
  precision: str  # The fast precision: like with like at it.
  steps: Mapping[str, TrainStep]
  loss_after_steps: int
  profile: Optional[Mapping[str, Mapping[str, float]]] = None

  @property
  def suffixes(self) -> Tuple[str, ...]:
    """The precisions both sides were timed in: 'fp32', and 'bf16' at a bfloat16 precision."""
    return tuple(s for s in ('fp32', 'bf16') if f'theirs_{s}' in self.steps)

  def ratio(self, suffix: str) -> float:
    return self.steps[f'ours_{suffix}'].median / self.steps[f'theirs_{suffix}'].median

  def ratio_bound(self, suffix: str) -> float:
    """Ours / TFM if everything but our convolutions and batch norms took no time."""
    ours, theirs = self.profile[f'ours_{suffix}'], self.profile[f'theirs_{suffix}']
    return (ours['conv'] + ours['norm_relu_pool']) / sum(theirs.values())

  @property
  def ratio_vs_tfm_fp32(self) -> float:
    """Ours at the fast precision against TFM's model as its factory builds it (float32)."""
    return self.steps[f'ours_{SUFFIX[self.precision]}'].median / self.steps['theirs_fp32'].median

  def to_json(self) -> Dict[str, Any]:
    row: Dict[str, Any] = {'train_batch': self.batch}
    for name, step in self.steps.items():
      row[f'train_step_s_{name}'] = step.median
      row[f'train_images_per_s_{name}'] = self.batch / step.median
      row[f'train_first_step_s_{name}'] = step.first
    row['train_loss_after_steps'] = self.loss_after_steps
    row['train_loss'] = {name: step.loss for name, step in self.steps.items()}
    if self.profile is not None:
      row['train_profile_s'] = {k: dict(v) for k, v in self.profile.items()}
      row.update({f'train_step_ratio_bound_{s}': self.ratio_bound(s) for s in self.suffixes})
    row.update({f'train_step_ratio_{s}': self.ratio(s) for s in self.suffixes})
    row['train_step_ratio'] = self.ratio(SUFFIX[self.precision])
    row['train_step_ratio_vs_tfm_fp32'] = self.ratio_vs_tfm_fp32
    return row


@dataclasses.dataclass(frozen=True)
class Memory:
  """Peak RSS (MB) by job ('infer', and 'train' unless skipped) then side."""
  peak_rss_mb: Mapping[str, Mapping[str, float]]

  def ratio(self, kind: str) -> float:
    return self.peak_rss_mb[kind]['ours'] / self.peak_rss_mb[kind]['theirs']

  def to_json(self) -> Dict[str, Any]:
    row = {}
    for kind, sides in self.peak_rss_mb.items():
      row.update({f'peak_rss_mb_{kind}_{side}': mb for side, mb in sides.items()})
      row[f'peak_memory_ratio_{kind}'] = self.ratio(kind)
    row['peak_memory_ratio'] = self.ratio('infer')
    return row


@dataclasses.dataclass(frozen=True)
class Ap:
  """COCO AP (0-1) by detector ('theirs', 'ours', 'ours_bf16') on `images` images; `identical`:
  the share of images where a detector's detections equal theirs (not for 'theirs')."""
  images: int
  model: str
  ap: Mapping[str, float]
  ap50: Mapping[str, float]
  eval_seconds: Mapping[str, float]
  identical: Mapping[str, float]

  @property
  def diff(self) -> float:
    return self.ap['ours'] - self.ap['theirs']

  def to_json(self) -> Dict[str, Any]:
    row: Dict[str, Any] = {'ap_images': self.images, 'ap_model': self.model}
    for name in self.ap:
      row[f'ap_{name}'] = self.ap[name]
      row[f'ap50_{name}'] = self.ap50[name]
      row[f'eval_seconds_{name}'] = self.eval_seconds[name]
    row.update({f'identical_detections_{name}': v for name, v in self.identical.items()})
    row['ap_diff'] = self.diff
    return row


@dataclasses.dataclass(frozen=True)
class ConfigResult:
  """Everything measured for one configuration; a section is None where it was skipped."""
  config: str
  label: str
  fast_precision: str
  params: int
  network_max_abs_diff: float
  network_max_abs_diff_bf16: Optional[float]  # None: ours not built in bfloat16.
  load_avg_start: float
  load_avg_end: float
  inference: Optional[Inference] = None
  training: Optional[Training] = None
  memory: Optional[Memory] = None
  ap: Optional[Ap] = None

  @property
  def bf16(self) -> bool:
    return self.fast_precision != 'float32'

  def to_json(self) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        'config': self.config, 'label': self.label, 'fast_precision': self.fast_precision,
        'params': self.params, 'network_max_abs_diff': self.network_max_abs_diff,
        'load_avg_start': self.load_avg_start, 'load_avg_end': self.load_avg_end}
    if self.network_max_abs_diff_bf16 is not None:
      row['network_max_abs_diff_bf16'] = self.network_max_abs_diff_bf16
    for section in (self.inference, self.training, self.memory, self.ap):
      if section is not None:
        row.update(section.to_json())
    return row
