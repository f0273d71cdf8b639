"""Inference latency, ours against TFM's, both float32 (ours in bfloat16 as an extra column):
end to end at batch 1 and 8, network only, and the post-processing alone in its worst case."""
import tensorflow as tf

from bench.models import (lifted_raw_outputs, ours_network_fn, random_images, tfm_detect_fn,
                          tfm_network_fn)
from bench.rows import Inference
from bench.timing import alternate

# Class prior that lifts every pre-NMS candidate above the 0.05 score threshold (worst case).
WORST_CASE_PRIOR = 0.3
# The names the network-only calls of each side go by in the progress lines.
_NETWORK_CALLS = {'ours': 'ours_net', 'theirs': 'theirs_net', 'ours_bf16': 'ours_bf16_net',
                  'ours_xla': 'ours_net_xla'}


def inference_comparison(ours, ours_bf16, tfm_model, size: int, repeats: int, repeats_b8: int,
                         xla: bool = False) -> Inference:
  """Times end to end at batch 1 (`repeats` calls per side) and 8 (`repeats_b8`), the network
  only at batch 1 (with `xla`, ours under XLA too), and the post-processing alone with every
  candidate above the threshold; `ours_bf16` (None: not measured) is an extra side."""
  e2e, network = {}, {}
  for batch, batch_repeats in ((1, repeats), (8, repeats_b8)):
    images = random_images(batch, size)
    calls = {'ours': tf.function(ours.detect), 'theirs': tfm_detect_fn(tfm_model, size)}
    if ours_bf16 is not None:
      calls['ours_bf16'] = tf.function(ours_bf16.detect)
    network_calls = {}
    if batch == 1:
      network_calls = {'ours': ours_network_fn(ours), 'theirs': tfm_network_fn(tfm_model)}
      if ours_bf16 is not None:
        network_calls['ours_bf16'] = ours_network_fn(ours_bf16)
      if xla:
        network_calls['ours_xla'] = ours_network_fn(ours, True)
    timed = {**calls, **{_NETWORK_CALLS[side]: f for side, f in network_calls.items()}}
    times = alternate({k: (lambda f=f: f(images)) for k, f in timed.items()}, batch_repeats,
                      f'b{batch}')
    e2e[batch] = {side: times[side] for side in calls}
    if batch == 1:
      network = {side: times[_NETWORK_CALLS[side]] for side in network_calls}

  # Post-processing alone, every candidate above the score threshold (our worst case).
  cls, box = lifted_raw_outputs(ours, random_images(1, size), WORST_CASE_PRIOR)
  anchors = ours.anchor_boxes
  theirs_generator = tfm_model.detection_generator
  ours_pp = tf.function(lambda c, b: ours.detection_generator(c, b, anchors))
  theirs_pp = tf.function(lambda c, b: theirs_generator(
      b, c, {k: v[None] for k, v in anchors.items()}, tf.constant([[size, size]], tf.float32)))
  times = alternate({'ours': lambda: ours_pp(cls, box), 'theirs': lambda: theirs_pp(cls, box)},
                    repeats, 'post-processing, all candidates pass, b1')
  return Inference(e2e=e2e, network=network,
                   postprocess_worst={side: t.median for side, t in times.items()})

