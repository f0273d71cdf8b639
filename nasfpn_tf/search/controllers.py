"""Controllers of the architecture search: they propose architectures and learn from rewards.

One interface: `propose() -> Proposal`, `feedback(proposal, reward)`, and `state()` /
`load_state(state)` (plain picklable Python and numpy) so that a resumed search continues the
same policy or population and the same random stream. Rewards may come back in any order and
several proposals may be out at once (parallel trials). `make_controller` builds one by name:
`random`, `evolution` (regularized evolution) or `ppo` (the paper's RNN controller). Their
hyperparameters are gin-configurable (`EvolutionController.*`, `PPOController.*`).
"""
import copy
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search import policy as policy_lib
from nasfpn_tf.search.space import SearchSpace


@dataclasses.dataclass(frozen=True)
class Proposal:
  """An architecture to train. `log_probs`: the policy's per decision when it was sampled
  (empty for random and evolution); `index`: its rank among its controller's proposals."""
  block_specs: Tuple[specs_lib.BlockSpec, ...]
  key: str
  actions: Tuple[int, ...]
  log_probs: Tuple[float, ...] = ()
  index: int = 0


class Controller:
  """The shared part: the space, a seeded numpy generator, proposal numbering, state checks."""
  name = ''

  def __init__(self, space: SearchSpace, seed: int = 0,
               init_block_specs: Optional[specs_lib.SpecLike] = None):
    self.space = space
    self._rng = np.random.default_rng(seed)
    self._init_actions = space.encode(init_block_specs) if init_block_specs else None
    self._num_proposed = 0

  def propose(self) -> Proposal:
    raise NotImplementedError

  def feedback(self, proposal: Proposal, reward: float) -> None:
    """Learns from the reward of one of this controller's proposals, in any order."""
    if not np.isfinite(reward):
      raise ValueError(f'Proposal {proposal.index} ({proposal.key}) got the reward {reward}; '
                       'a reward must be finite (give a failed trial the lowest reward).')
    self._learn(proposal, float(reward))

  def _learn(self, proposal: Proposal, reward: float) -> None:
    raise NotImplementedError

  def state(self) -> Dict[str, Any]:
    return {'controller': self.name, 'space': self.space.config(),
            'rng': copy.deepcopy(self._rng.bit_generator.state),
            'num_proposed': self._num_proposed}

  def load_state(self, state: Dict[str, Any]) -> None:
    if state.get('controller') != self.name:
      raise ValueError(f'A state of controller {state.get("controller")!r} cannot be loaded '
                       f'into a {self.name!r} controller.')
    if state['space'] != self.space.config():
      raise ValueError(f'A state of the search space {state["space"]} cannot be loaded into a '
                       f'controller of {self.space.config()}.')
    self._rng.bit_generator.state = copy.deepcopy(state['rng'])
    self._num_proposed = state['num_proposed']

  def _proposal(self, actions, log_probs=()) -> Proposal:
    specs = self.space.decode(actions)
    proposal = Proposal(specs, self.space.key(specs), tuple(int(a) for a in actions),
                        tuple(float(p) for p in log_probs), self._num_proposed)
    self._num_proposed += 1
    return proposal


class RandomController(Controller):
  """Random search: every decision uniform over its valid options (the init table first)."""
  name = 'random'

  def propose(self) -> Proposal:
    if self._init_actions is not None and self._num_proposed == 0:
      return self._proposal(self._init_actions)
    return self._proposal(self.space.sample_actions(self._rng))

  def _learn(self, proposal: Proposal, reward: float) -> None:
    del proposal, reward  # Random search learns nothing.


@gin.configurable(denylist=['space', 'seed', 'init_block_specs'])
class EvolutionController(Controller):
  """Regularized evolution (Real et al. 2019, "aging evolution").

  The population holds the last `population_size` architectures whose rewards came back. A
  proposal mutates one decision of the best of `tournament_size` members drawn at random; the
  oldest member dies when a new one joins. Until the population is full it proposes uniform
  samples or, with `init_block_specs`, that table first and then its mutants.
  """
  name = 'evolution'

  def __init__(self, space: SearchSpace, seed: int = 0,
               init_block_specs: Optional[specs_lib.SpecLike] = None,
               population_size: int = 20, tournament_size: int = 5):
    super().__init__(space, seed, init_block_specs)
    if not 1 <= tournament_size <= population_size:
      raise ValueError(f'EvolutionController.tournament_size={tournament_size} must be in '
                       f'1..population_size={population_size}.')
    self.population_size = population_size
    self.tournament_size = tournament_size
    self._population: List[Tuple[Tuple[int, ...], float]] = []  # oldest first

  def propose(self) -> Proposal:
    if len(self._population) < self.population_size:
      if self._init_actions is None:
        return self._proposal(self.space.sample_actions(self._rng))
      if self._num_proposed == 0:
        return self._proposal(self._init_actions)
      return self._proposal(mutate(self.space, self._init_actions, self._rng))
    drawn = self._rng.choice(len(self._population), self.tournament_size, replace=False)
    parent = max(drawn, key=lambda i: self._population[i][1])
    return self._proposal(mutate(self.space, self._population[parent][0], self._rng))

  def _learn(self, proposal: Proposal, reward: float) -> None:
    self._population.append((proposal.actions, reward))
    if len(self._population) > self.population_size:
      self._population.pop(0)

  def state(self) -> Dict[str, Any]:
    return {**super().state(), 'population': list(self._population)}

  def load_state(self, state: Dict[str, Any]) -> None:
    super().load_state(state)
    self._population = list(state['population'])


def mutate(space: SearchSpace, actions, rng: np.random.Generator) -> Tuple[int, ...]:
  """Changes one decision (uniform over those with another valid option) to another valid
  option; a later decision is drawn again only if the change makes it invalid."""
  actions = list(actions)
  mutable = [t for t in range(space.num_decisions) if space.options(actions[:t]).sum() > 1]
  t = int(rng.choice(mutable))
  others = np.flatnonzero(space.options(actions[:t]))
  actions[t] = int(rng.choice(others[others != actions[t]]))
  for later in range(t + 1, space.num_decisions):
    mask = space.options(actions[:later])
    if not mask[actions[later]]:
      actions[later] = int(rng.choice(np.flatnonzero(mask)))
  return tuple(actions)


@gin.configurable(denylist=['space', 'seed', 'init_block_specs'])
class PPOController(Controller):
  """The paper's controller: an LSTM policy (`policy.Policy`) trained with PPO.

  Each proposal keeps the log-probabilities of its decisions at sampling. Once `batch_size`
  rewards have come back (in any order), the batch, in proposal order, takes `num_epochs` Adam
  steps of `policy.ppo_loss`: the ratio is against each proposal's own log-probabilities, the
  advantage is (reward - baseline) / scale, where baseline and scale are moving averages (decay
  `baseline_decay` per batch) of the rewards and of their squared deviation, both from before
  the batch (the first batch uses its own). With `init_block_specs`, the policy first takes
  `init_fit_steps` Adam steps of maximum likelihood on that table.
  """
  name = 'ppo'

  def __init__(self, space: SearchSpace, seed: int = 0,
               init_block_specs: Optional[specs_lib.SpecLike] = None,
               lstm_units: int = 64, learning_rate: float = 1e-3, batch_size: int = 16,
               num_epochs: int = 4, clip: float = 0.2, entropy_weight: float = 0.01,
               baseline_decay: float = 0.9, init_fit_steps: int = 50):
    super().__init__(space, seed, init_block_specs)
    if batch_size < 1 or num_epochs < 1:
      raise ValueError(f'PPOController.batch_size={batch_size} and num_epochs={num_epochs} '
                       'must be >= 1.')
    self.batch_size = batch_size
    self.num_epochs = num_epochs
    self.clip = clip
    self.entropy_weight = entropy_weight
    self.baseline_decay = baseline_decay
    self.policy = policy_lib.Policy(space.static_masks, space.exclusions, lstm_units, seed)
    self._optimizer = tf_keras.optimizers.Adam(learning_rate)
    num_steps, vocabulary = space.static_masks.shape
    self.policy.score(tf.zeros([1, num_steps], tf.int32))  # creates the weights
    self._optimizer.build(self.policy.trainable_variables)
    actions_spec = tf.TensorSpec([None, num_steps], tf.int32)
    self._sample = tf.function(
        self.policy.sample,
        input_signature=[tf.TensorSpec([1, num_steps, vocabulary], tf.float32)])
    self._ppo_step = tf.function(self._ppo_step_eager, input_signature=[
        actions_spec, tf.TensorSpec([None, num_steps]), tf.TensorSpec([None])])
    self._fit_step = tf.function(self._fit_step_eager, input_signature=[actions_spec])
    self._pending: List[Tuple[int, Tuple[int, ...], Tuple[float, ...], float]] = []
    self._baseline: Optional[float] = None
    self._reward_variance: Optional[float] = None
    if self._init_actions is not None:
      for _ in range(init_fit_steps):
        self._fit_step(tf.constant([self._init_actions], tf.int32))

  def propose(self) -> Proposal:
    gumbel = self._rng.gumbel(size=self.space.static_masks.shape).astype(np.float32)
    actions, log_probs = self._sample(gumbel[np.newaxis])
    return self._proposal(actions.numpy()[0], log_probs.numpy()[0])

  def _learn(self, proposal: Proposal, reward: float) -> None:
    if len(proposal.log_probs) != self.space.num_decisions:
      raise ValueError(f'Proposal {proposal.index} ({proposal.key}) has no log-probabilities '
                       'of this policy: PPO learns only from its own proposals.')
    self._pending.append((proposal.index, proposal.actions, proposal.log_probs, reward))
    if len(self._pending) >= self.batch_size:
      self._update()

  def _update(self) -> None:
    """num_epochs PPO steps on the pending batch, then the moving averages take its rewards."""
    batch = sorted(self._pending)  # proposal order: the update is the same whatever the
    self._pending = []             # order the rewards came back in
    rewards = np.array([reward for *_, reward in batch])
    if self._baseline is None:
      self._baseline, self._reward_variance = float(rewards.mean()), float(rewards.var())
    advantages = (rewards - self._baseline) / max(np.sqrt(self._reward_variance), 1e-8)
    actions = tf.constant([row[1] for row in batch], tf.int32)
    old_log_probs = tf.constant([row[2] for row in batch], tf.float32)
    advantages = tf.constant(advantages, tf.float32)
    for _ in range(self.num_epochs):
      self._ppo_step(actions, old_log_probs, advantages)
    decay = self.baseline_decay
    deviation = float(np.mean((rewards - self._baseline)**2))
    self._baseline = decay * self._baseline + (1 - decay) * float(rewards.mean())
    self._reward_variance = decay * self._reward_variance + (1 - decay) * deviation

  def _ppo_step_eager(self, actions, old_log_probs, advantages):
    with tf.GradientTape() as tape:
      log_probs, entropies = self.policy.score(actions)
      loss = policy_lib.ppo_loss(log_probs, old_log_probs, advantages, entropies, self.clip,
                                 self.entropy_weight)
    self._apply(tape, loss)
    return loss

  def _fit_step_eager(self, actions):
    with tf.GradientTape() as tape:
      log_probs, _ = self.policy.score(actions)
      loss = -tf.reduce_mean(tf.reduce_sum(log_probs, axis=1))
    self._apply(tape, loss)
    return loss

  def _apply(self, tape, loss):
    variables = self.policy.trainable_variables
    self._optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

  def state(self) -> Dict[str, Any]:
    return {**super().state(), 'weights': self.policy.get_weights(),
            'optimizer': [v.numpy() for v in self._optimizer.variables],
            'pending': list(self._pending), 'baseline': self._baseline,
            'reward_variance': self._reward_variance}

  def load_state(self, state: Dict[str, Any]) -> None:
    super().load_state(state)
    self.policy.set_weights(state['weights'])
    for variable, value in zip(self._optimizer.variables, state['optimizer'], strict=True):
      variable.assign(value)
    self._pending = list(state['pending'])
    self._baseline = state['baseline']
    self._reward_variance = state['reward_variance']


CONTROLLERS = {'random': RandomController, 'evolution': EvolutionController,
               'ppo': PPOController}


def make_controller(name: str, space: SearchSpace, seed: int = 0,
                    init_block_specs: Optional[specs_lib.SpecLike] = None) -> Controller:
  """The controller `name` (a key of CONTROLLERS); its hyperparameters come from gin."""
  if name not in CONTROLLERS:
    raise ValueError(f'Unknown controller {name!r}; controllers are {sorted(CONTROLLERS)}.')
  return CONTROLLERS[name](space, seed=seed, init_block_specs=init_block_specs)
