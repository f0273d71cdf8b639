"""DropBlock (Ghiasi, Lin, Le, NeurIPS 2018): drops contiguous square regions of a feature map."""
import tensorflow as tf
import tf_keras


def set_dropblock_step(model, step):
  """Ties the keep-probability ramp of every DropBlock layer in `model` to a training step.

  Call it from the train step with the optimizer's iteration count; it works inside tf.function
  and in a tf.distribute replica context.
  """
  for layer in model.submodules:
    if isinstance(layer, DropBlock):
      layer.step.assign(tf.cast(step, tf.int64))


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class DropBlock(tf_keras.layers.Layer):
  """DropBlock on NHWC features; the identity at inference or when keep_prob is None or 1.

  While training, the keep probability ramps linearly from 1 at step 0 to `keep_prob` at
  `ramp_steps` (0: constant `keep_prob`), as the paper's schedule. Block seeds are drawn only
  where a whole block fits, with the rate chosen so that about 1 - keep_prob of the map is
  dropped; the kept activations are rescaled by the inverse of the kept fraction. Height and
  width are handled separately (non-square maps), and the block shrinks to fit maps smaller than
  it. The mask is computed in float32 and applied in the input dtype (mixed precision).
  """

  def __init__(self, keep_prob=0.9, block_size=3, ramp_steps=0, seed=None, **kwargs):
    super().__init__(**kwargs)
    if keep_prob is not None and not 0.0 < keep_prob <= 1.0:
      raise ValueError(f'DropBlock keep_prob must be in (0, 1], got {keep_prob}.')
    if block_size < 1:
      raise ValueError(f'DropBlock block_size must be >= 1, got {block_size}.')
    self.keep_prob = keep_prob
    self.block_size = block_size
    self.ramp_steps = ramp_steps
    self.seed = seed

  def build(self, input_shape):
    self.step = self.add_weight(
        'step', shape=[], dtype=tf.int64, initializer='zeros', trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    super().build(input_shape)

  def current_keep_prob(self):
    """The keep probability at the current step of the ramp."""
    if self.ramp_steps <= 0:
      return tf.constant(self.keep_prob, tf.float32)
    progress = tf.minimum(tf.cast(self.step, tf.float32) / float(self.ramp_steps), 1.0)
    return 1.0 - progress * (1.0 - self.keep_prob)

  def call(self, inputs, training=None):
    if not training or self.keep_prob is None or self.keep_prob == 1.0:
      return inputs
    shape = tf.shape(inputs)
    height, width = shape[1], shape[2]
    block = tf.minimum(self.block_size, tf.minimum(height, width))
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    b = tf.cast(block, tf.float32)
    keep_prob = self.current_keep_prob()
    gamma = (1.0 - keep_prob) * h * w / (b * b) / ((h - b + 1.0) * (w - b + 1.0))
    # Seeds only where the block centred on them lies inside the map.
    rows, cols = tf.range(height), tf.range(width)
    half_lo, half_hi = block // 2, (block - 1) // 2
    valid_rows = (rows >= half_lo) & (rows < height - half_hi)
    valid_cols = (cols >= half_lo) & (cols < width - half_hi)
    valid = tf.cast(valid_rows[:, None] & valid_cols[None, :], tf.float32)[None, :, :, None]
    noise = tf.random.uniform(shape, dtype=tf.float32, seed=self.seed)
    seeds = tf.cast(noise < gamma, tf.float32) * valid
    # MaxPoolV2 takes the (possibly shrunk) block size as a tensor.
    dropped = tf.raw_ops.MaxPoolV2(input=seeds, ksize=tf.stack([1, block, block, 1]),
                                   strides=[1, 1, 1, 1], padding='SAME')
    keep_mask = 1.0 - dropped
    kept = tf.reduce_sum(keep_mask)
    scale = tf.cast(tf.size(keep_mask), tf.float32) / tf.maximum(kept, 1.0)
    return inputs * tf.cast(keep_mask * scale, inputs.dtype)

  def get_config(self):
    return {**super().get_config(), 'keep_prob': self.keep_prob, 'block_size': self.block_size,
            'ramp_steps': self.ramp_steps, 'seed': self.seed}
