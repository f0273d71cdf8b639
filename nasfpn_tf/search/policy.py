"""The PPO controller's policy: an LSTM that takes the decisions of a `SearchSpace` in order.

At each step the LSTM is fed an embedding of the previous decision (its own token per step and
action, so the LSTM also knows where it is) and emits one softmax over the step's fixed
vocabulary through the step's own classifier, masked to the valid options (the space's static
mask minus the earlier actions the step excludes). `sample` takes the decisions one by one
(argmax of logits + Gumbel noise that the caller draws, so the controller's numpy generator is
the only source of randomness); `score` reads given decisions in one pass over the sequence, with
the same cell, classifiers and masks.
"""
import numpy as np
import tensorflow as tf
import tf_keras

_MASKED_LOGIT = -1e9


class Policy(tf_keras.Model):
  """p(actions) = prod_t softmax_t(LSTM state_t)[action_t], each softmax masked to valid options.

  `static_masks` [T, V] and `exclusions` [T, T] are the space's (`SearchSpace.static_masks`,
  `.exclusions`); `seed` makes the initial weights.
  """

  def __init__(self, static_masks: np.ndarray, exclusions: np.ndarray, units: int, seed: int,
               **kwargs):
    super().__init__(**kwargs)
    self._static_masks = tf.constant(static_masks, tf.bool)
    self._exclusions = tf.constant(exclusions, tf.float32)
    num_steps, vocabulary = static_masks.shape
    self.embedding = tf_keras.layers.Embedding(
        num_steps * vocabulary + 1, units,
        embeddings_initializer=tf_keras.initializers.RandomUniform(-0.1, 0.1, seed=seed))
    self.cell = tf_keras.layers.LSTMCell(
        units, kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed + 1),
        recurrent_initializer=tf_keras.initializers.Orthogonal(seed=seed + 2))
    self.lstm = tf_keras.layers.RNN(self.cell, return_sequences=True)
    self.head_kernel = self.add_weight(
        name='head_kernel', shape=[num_steps, units, vocabulary],
        initializer=tf_keras.initializers.GlorotUniform(seed=seed + 3))
    self.head_bias = self.add_weight(name='head_bias', shape=[num_steps, vocabulary],
                                     initializer='zeros')

  def score(self, actions):
    """(log_probs, entropies), both [B, T], of the decisions `actions` [B, T] (int32)."""
    num_steps, vocabulary = self._static_masks.shape
    batch = tf.shape(actions)[0]
    tokens = tf.concat([tf.zeros([batch, 1], tf.int32),
                        tf.range(num_steps - 1) * vocabulary + actions[:, :-1] + 1], axis=1)
    outputs = self.lstm(self.embedding(tokens))
    logits = tf.einsum('btu,tuv->btv', outputs, self.head_kernel) + self.head_bias
    one_hot = tf.one_hot(actions, vocabulary)
    log_probs, entropies = _masked(logits, self._masks(tf.range(num_steps), one_hot))
    return tf.reduce_sum(log_probs * one_hot, axis=-1), entropies

  def sample(self, gumbel):
    """(actions [B, T] int32, log_probs [B, T]) drawn with `gumbel` [B, T, V] noise."""
    num_steps, vocabulary = self._static_masks.shape
    batch = tf.shape(gumbel)[0]

    def step(t, token, state, taken, log_probs):
      """Decision t; `taken` [B, T, V] and `log_probs` [B, T] are zero from step t on."""
      output, state = self.cell(self.embedding(token), state)
      logits = tf.matmul(output, tf.gather(self.head_kernel, t)) + tf.gather(self.head_bias, t)
      step_log_probs, _ = _masked(logits, self._masks(t[tf.newaxis], taken)[:, 0])
      action = tf.argmax(step_log_probs + gumbel[:, t], axis=-1, output_type=tf.int32)
      one_hot = tf.one_hot(action, vocabulary)
      at_t = tf.one_hot(t, num_steps)
      taken += one_hot[:, tf.newaxis] * at_t[tf.newaxis, :, tf.newaxis]
      log_probs += tf.reduce_sum(step_log_probs * one_hot, axis=-1, keepdims=True) * at_t
      return t + 1, t * vocabulary + action + 1, state, taken, log_probs

    initial = (tf.constant(0), tf.zeros([batch], tf.int32),
               self.cell.get_initial_state(batch_size=batch, dtype=tf.float32),
               tf.zeros([batch, num_steps, vocabulary]), tf.zeros([batch, num_steps]))
    _, _, _, taken, log_probs = tf.while_loop(lambda t, *_: t < num_steps, step, initial)
    return tf.argmax(taken, axis=-1, output_type=tf.int32), log_probs

  def _masks(self, steps, taken):
    """[B, S, V]: the valid options of `steps` [S] given the actions `taken` [B, T, V] (one-hot,
    zero for steps not taken yet)."""
    excluded = tf.einsum('sj,bjv->bsv', tf.gather(self._exclusions, steps), taken) > 0
    static = tf.gather(self._static_masks, steps)
    return tf.logical_and(static[tf.newaxis], tf.logical_not(excluded))


def _masked(logits, mask):
  """The log-softmax of `logits` over the options in `mask` (invalid ones get about -1e9), and
  its entropy."""
  log_probs = tf.nn.log_softmax(tf.where(mask, logits, _MASKED_LOGIT))
  entropies = -tf.reduce_sum(tf.where(mask, tf.exp(log_probs) * log_probs, 0.), axis=-1)
  return log_probs, entropies


def ppo_loss(new_log_probs, old_log_probs, advantages, entropies, clip: float,
             entropy_weight: float):
  """PPO's clipped surrogate (Schulman et al. 2017), per decision, minus an entropy bonus.

  new_log_probs, old_log_probs, entropies: [B, T], the policy's now and at sampling; advantages:
  [B], one per proposal, shared by its decisions. Returns the scalar to minimize:
  -mean(min(r A, clip(r, 1 - clip, 1 + clip) A)) - entropy_weight * mean(entropy),
  r = exp(new - old).
  """
  ratio = tf.exp(new_log_probs - old_log_probs)
  advantages = tf.expand_dims(advantages, 1)
  surrogate = tf.minimum(ratio * advantages,
                         tf.clip_by_value(ratio, 1. - clip, 1. + clip) * advantages)
  return -tf.reduce_mean(surrogate) - entropy_weight * tf.reduce_mean(entropies)
