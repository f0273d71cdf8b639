"""Which training images an epoch shows, and how often: uniform, class-balanced or repeat-factor.

`build_train_dataset.sampling` picks it:
  'uniform'         every image once per pass (the default, the pipeline as it always was);
  'class_balanced'  the weighting of the fourth seed document (a detection-competition entry): an
                    image's weight is the mean, over the C_i classes it contains, of the class's
                    inverse prior, W_i = 1/C_i sum_c h_c / (N p_c), where p_c is class c's share
                    of all boxes, N the number of classes with boxes and h_c = 1 when the image
                    holds class c. The slide's own formula is an image lost from the seed's text;
                    its symbols are kept, with N scaling 1/p_c by the uniform prior 1/N: a
                    balanced dataset then weighs every image 1, as does an image without boxes.
                    Images are drawn in proportion to W_i, the epoch keeping its size: image i is
                    expected n W_i / sum_j W_j times per pass over the n images;
  'repeat_factor'   LVIS's repeat-factor sampling (Gupta et al. 2019, detectron2's
                    RepeatFactorTrainingSampler): f(c) the fraction of images holding class c,
                    r(c) = max(1, sqrt(t / f(c))) with t = `repeat_threshold` (LVIS: 0.001),
                    image i repeated r_i = max over its classes of r(c) times per pass (1
                    without boxes): classes rarer than t are oversampled, the epoch grows.
Crowd boxes count for nothing, as training leaves them out.

The class statistics come from one pass over the records themselves (`read_record_classes`),
not from a file the converter writes: any detection TFRecords work (ours, TF Model Garden's,
older conversions), and they cannot disagree with the records the pipeline reads. The pass reads
only the label features, no image decoding.

Each pass ("epoch" e) repeats image i floor(m_i) times plus once more with probability
frac(m_i) (stochastic rounding, as detectron2), the coins drawn by `epoch_counts` from
(`seed`, e): which images an epoch holds, and how often, is a function of the seed. Images are
numbered by their position in the sorted files, so with tf.distribute every input pipeline
(files, or records when there are fewer files than pipelines, split by number) draws the same
coins: together they sample exactly what one pipeline would. The order within an epoch is the
shuffle's, not pinned (parallel reading, as in uniform sampling).
"""
import dataclasses
import functools
import math
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from nasfpn_tf.data import tfexample

SAMPLINGS = ('uniform', 'class_balanced', 'repeat_factor')
DEFAULT_REPEAT_THRESHOLD = 0.001  # LVIS's t
_PROGRESS_EVERY = 20000  # records between progress lines of the statistics pass


@dataclasses.dataclass(frozen=True)
class RecordClasses:
  """The classes of every record of `files`, numbered in file order then record order."""
  files: Tuple[str, ...]
  offsets: Tuple[int, ...]  # the first record number of each file, then the total
  image_classes: Tuple[Tuple[int, ...], ...]  # each record's distinct non-crowd class ids
  box_counts: Tuple[Tuple[int, int], ...]  # (class id, non-crowd boxes), by class id

  @property
  def num_images(self) -> int:
    return len(self.image_classes)


def check_sampling(sampling: str, repeat_threshold: Optional[float], seed: int) -> None:
  """Raises ValueError naming the `build_train_dataset` binding at fault."""
  if sampling not in SAMPLINGS:
    raise ValueError(f'build_train_dataset.sampling = {sampling!r} is not one of '
                     f'{list(SAMPLINGS)}.')
  if repeat_threshold is not None:
    if sampling != 'repeat_factor':
      raise ValueError(f'build_train_dataset.repeat_threshold = {repeat_threshold!r} applies to '
                       f"sampling = 'repeat_factor' only (sampling is {sampling!r}).")
    if (isinstance(repeat_threshold, bool) or not isinstance(repeat_threshold, (int, float)) or
        not 0 < repeat_threshold <= 1):
      raise ValueError(f'build_train_dataset.repeat_threshold = {repeat_threshold!r}: give a '
                       f'fraction of images in (0, 1] (LVIS: {DEFAULT_REPEAT_THRESHOLD}).')
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f'build_train_dataset.sampling_seed = {seed!r}: give an integer >= 0.')


@functools.lru_cache(maxsize=4)
def _read_record_classes(files: Tuple[str, ...], stamps: Tuple[Tuple[int, float], ...]):
  del stamps  # Part of the cache key only: rewritten files are read again.
  features = {tfexample.LABEL: tf.io.RaggedFeature(tf.int64),
              tfexample.IS_CROWD: tf.io.RaggedFeature(tf.int64)}
  offsets, image_classes, boxes = [0], [], {}
  start = time.perf_counter()
  for path in files:
    batches = tf.data.TFRecordDataset(path).batch(512).map(
        lambda serialized: tf.io.parse_example(serialized, features))
    for batch in batches:
      labels, crowd = batch[tfexample.LABEL].to_list(), batch[tfexample.IS_CROWD].to_list()
      for image_labels, image_crowd in zip(labels, crowd):
        image_crowd = image_crowd + [0] * (len(image_labels) - len(image_crowd))
        kept = [int(c) for c, is_crowd in zip(image_labels, image_crowd) if not is_crowd]
        for c in kept:
          boxes[c] = boxes.get(c, 0) + 1
        image_classes.append(tuple(sorted(set(kept))))
        if len(image_classes) % _PROGRESS_EVERY == 0:
          print(f'sampling: read the classes of {len(image_classes)} records '
                f'({time.perf_counter() - start:.0f} s)', file=sys.stderr, flush=True)
    offsets.append(len(image_classes))
  print(f'sampling: {len(image_classes)} records, {len(boxes)} classes, '
        f'{sum(boxes.values())} boxes in {len(files)} file(s), read in '
        f'{time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
  return RecordClasses(tuple(files), tuple(offsets), tuple(image_classes),
                       tuple(sorted(boxes.items())))


def read_record_classes(files: Sequence[str]) -> RecordClasses:
  """One ordered pass over the label features of `files` (cached while they are unchanged, so
  every replica's input pipeline in a process shares it)."""
  files = tuple(files)
  stamps = tuple((tf.io.gfile.stat(f).length, tf.io.gfile.stat(f).mtime_nsec) for f in files)
  return _read_record_classes(files, stamps)


def class_balanced_weights(record_classes: RecordClasses) -> np.ndarray:
  """W_i = 1/C_i sum_{c in image i} 1 / (N p_c) per image (1 for an image without boxes)."""
  counts = dict(record_classes.box_counts)
  total, num_classes = sum(counts.values()), len(counts)
  inverse_prior = {c: total / (num_classes * n) for c, n in counts.items()}
  return np.array([np.mean([inverse_prior[c] for c in classes]) if classes else 1.0
                   for classes in record_classes.image_classes], np.float64)


def repeat_factors(record_classes: RecordClasses,
                   repeat_threshold: float = DEFAULT_REPEAT_THRESHOLD) -> np.ndarray:
  """r_i = max over image i's classes of max(1, sqrt(t / f(c))) (1 for an image without boxes)."""
  images_with = {}
  for classes in record_classes.image_classes:
    for c in classes:
      images_with[c] = images_with.get(c, 0) + 1
  n = record_classes.num_images
  factor = {c: max(1.0, math.sqrt(repeat_threshold / (k / n))) for c, k in images_with.items()}
  return np.array([max((factor[c] for c in classes), default=1.0)
                   for classes in record_classes.image_classes], np.float64)


def expected_repeats(record_classes: RecordClasses, sampling: str,
                     repeat_threshold: Optional[float] = None) -> np.ndarray:
  """m_i, image i's expected number of appearances per pass over the records."""
  if sampling == 'uniform':
    return np.ones(record_classes.num_images)
  if sampling == 'class_balanced':
    weights = class_balanced_weights(record_classes)
    return weights * (len(weights) / weights.sum())
  return repeat_factors(record_classes, repeat_threshold or DEFAULT_REPEAT_THRESHOLD)


def epoch_counts(repeats: tf.Tensor, seed: int, epoch) -> tf.Tensor:
  """int64 [N]: how often each image appears in pass `epoch`: floor(m_i) + 1 with probability
  frac(m_i), the coins drawn from (seed, epoch) alone."""
  repeats = tf.convert_to_tensor(repeats, tf.float64)
  coins = tf.random.stateless_uniform(
      tf.shape(repeats), seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]),
      dtype=tf.float64)
  whole = tf.floor(repeats)
  return tf.cast(whole, tf.int64) + tf.cast(coins < repeats - whole, tf.int64)


def sampled_records(files: Sequence[str], sampling: str,
                    input_context: Optional[tf.distribute.InputContext] = None, seed: int = 0,
                    repeat_threshold: Optional[float] = None,
                    cycle_length: int = 16) -> tf.data.Dataset:
  """Endless serialized records of `files` (sorted), pass after pass, each image as often as
  `epoch_counts` says; this input pipeline's share with `input_context`."""
  files = sorted(files)
  record_classes = read_record_classes(files)
  repeats = tf.constant(expected_repeats(record_classes, sampling, repeat_threshold), tf.float64)
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  shard_files = len(files) >= num_pipelines  # as the uniform pipeline shards
  file_ids = list(range(len(files)))
  if shard_files:
    file_ids = file_ids[pipeline_id::num_pipelines]
  offsets = tf.constant([record_classes.offsets[i] for i in file_ids], tf.int64)
  paths = tf.constant([files[i] for i in file_ids])

  def numbered(offset, path):
    return tf.data.TFRecordDataset(path).enumerate().map(
        lambda index, record: (offset + index, record))

  def one_epoch(epoch):
    counts = epoch_counts(repeats, seed, epoch)
    records = tf.data.Dataset.from_tensor_slices((offsets, paths)).shuffle(len(file_ids))
    records = records.interleave(numbered, cycle_length=min(cycle_length, len(file_ids)),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    if not shard_files:
      records = records.filter(lambda number, _: number % num_pipelines == pipeline_id)
    return records.flat_map(
        lambda number, record: tf.data.Dataset.from_tensors(record).repeat(counts[number]))

  return tf.data.Dataset.counter().flat_map(one_epoch)
