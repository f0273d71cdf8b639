"""The controllers: proposals in the space, PPO's loss and learning, state and feedback order."""
import pickle

import gin
import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search import controllers as controllers_lib
from nasfpn_tf.search.controllers import make_controller
from nasfpn_tf.search.policy import ppo_loss
from nasfpn_tf.search.space import SearchSpace

SPACE = SearchSpace()
TARGET = np.array(SPACE.encode('nasfpn'))


def agreement(proposal):
  """The synthetic reward: the fraction of decisions that agree with the paper's NAS-FPN."""
  return float(np.mean(np.array(proposal.actions) == TARGET))


def run(controller, num_proposals):
  """Proposes and feeds back the synthetic reward in turn; the proposals and their rewards."""
  proposals, rewards = [], []
  for _ in range(num_proposals):
    proposals.append(controller.propose())
    rewards.append(agreement(proposals[-1]))
    controller.feedback(proposals[-1], rewards[-1])
  return proposals, rewards


def test_ppo_loss_and_its_gradient_match_numpy():
  rng = np.random.default_rng(0)
  new, old = rng.normal(-1, 0.3, [4, 6]), rng.normal(-1, 0.3, [4, 6])
  advantages, entropies = rng.normal(0, 1, [4]), rng.uniform(0, 2, [4, 6])
  ratio = np.exp(new - old)
  assert (ratio > 1.2).any() and (ratio < 0.8).any()  # both clips are exercised
  unclipped, clipped = ratio * advantages[:, None], np.clip(ratio, 0.8, 1.2) * advantages[:, None]
  expected = -np.minimum(unclipped, clipped).mean() - 0.01 * entropies.mean()
  new_tensor = tf.constant(new, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(new_tensor)
    loss = ppo_loss(new_tensor, tf.constant(old, tf.float32), tf.constant(advantages, tf.float32),
                    tf.constant(entropies, tf.float32), clip=0.2, entropy_weight=0.01)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
  # The gradient flows only where the unclipped term is the smaller one.
  expected_gradient = np.where(unclipped <= clipped, -unclipped / unclipped.size, 0.)
  np.testing.assert_allclose(tape.gradient(loss, new_tensor).numpy(), expected_gradient,
                             rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('name', ['random', 'evolution', 'ppo'])
def test_every_proposal_is_in_the_space_and_validates(name):
  controller = make_controller(name, SPACE, seed=1)
  proposals, _ = run(controller, 200)
  for proposal in proposals:
    specs_lib.validate(proposal.block_specs, 3, 7)
    assert SPACE.decode(proposal.actions) == proposal.block_specs
    assert proposal.key == SPACE.key(proposal.block_specs)
    assert len(proposal.log_probs) == (28 if name == 'ppo' else 0)
  assert [p.index for p in proposals] == list(range(200))
  assert pickle.loads(pickle.dumps(proposals[-1])) == proposals[-1]
  if name == 'ppo':
    log_probs = np.array([p.log_probs for p in proposals])
    assert np.all(log_probs <= 0) and np.all(np.isfinite(log_probs))
    assert np.all(log_probs[:, 26] == 0)  # the last output level is forced
  assert len({p.key for p in proposals}) > 100


def test_ppo_stores_the_log_probs_its_policy_gives_the_proposal():
  controller = make_controller('ppo', SPACE, seed=2)
  proposals = [controller.propose() for _ in range(5)]
  scored, _ = controller.policy.score(tf.constant([p.actions for p in proposals]))
  np.testing.assert_allclose(scored.numpy(), [p.log_probs for p in proposals], atol=1e-5)


def test_ppo_learns_a_synthetic_reward_far_beyond_random_search():
  budget = 1500
  _, ppo = run(make_controller('ppo', SPACE, seed=0), budget)
  _, evolution = run(make_controller('evolution', SPACE, seed=0), budget)
  _, random = run(make_controller('random', SPACE, seed=0), budget)
  assert np.mean(ppo[-100:]) >= 0.9 and max(ppo) >= 0.95
  assert max(random) <= 0.65 and np.mean(random[-100:]) <= 0.3
  assert max(evolution) >= max(random) + 0.2


@pytest.mark.parametrize('name', ['random', 'evolution', 'ppo'])
def test_a_restored_controller_continues_as_the_original(name):
  gin.bind_parameter('EvolutionController.population_size', 6)
  gin.bind_parameter('EvolutionController.tournament_size', 3)
  gin.bind_parameter('PPOController.batch_size', 4)
  original = make_controller(name, SPACE, seed=3)
  in_flight = [original.propose() for _ in range(3)]
  run(original, 10)  # fills evolution's population; 2 PPO updates and 2 rewards pending
  restored = make_controller(name, SPACE, seed=4)
  restored.load_state(pickle.loads(pickle.dumps(original.state())))
  continued = []
  for controller in (original, restored):
    for proposal in in_flight:
      controller.feedback(proposal, agreement(proposal))
    continued.append(run(controller, 12)[0])
  assert [p.actions for p in continued[0]] == [p.actions for p in continued[1]]
  np.testing.assert_allclose([p.log_probs for p in continued[0]],
                             [p.log_probs for p in continued[1]], atol=1e-6)


def test_ppo_update_does_not_depend_on_the_order_rewards_come_back_in():
  config.parse_gin(gin_bindings=['PPOController.batch_size = 8'])
  in_order, shuffled = make_controller('ppo', SPACE, seed=5), make_controller('ppo', SPACE, seed=5)
  before = in_order.policy.get_weights()
  proposals = [in_order.propose() for _ in range(8)]
  assert [shuffled.propose() for _ in range(8)] == proposals
  for i in range(8):
    in_order.feedback(proposals[i], agreement(proposals[i]))
  for i in np.random.default_rng(0).permutation(8):
    shuffled.feedback(proposals[i], agreement(proposals[i]))
  after = in_order.policy.get_weights()
  assert not all(np.array_equal(a, b) for a, b in zip(before, after))  # it did update
  for a, b in zip(after, shuffled.policy.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert in_order.propose() == shuffled.propose()


def test_init_table_comes_first_or_is_fitted():
  assert make_controller('random', SPACE, init_block_specs='nasfpn').propose().key == \
      SPACE.key('nasfpn')
  evolution = make_controller('evolution', SPACE, init_block_specs=specs_lib.NASFPN)
  first, *mutants = [evolution.propose() for _ in range(10)]
  assert first.actions == tuple(TARGET)
  assert all(0 < np.sum(np.array(m.actions) != TARGET) < 28 for m in mutants)
  untrained = make_controller('ppo', SPACE, seed=0)
  fitted = make_controller('ppo', SPACE, seed=0, init_block_specs='nasfpn')
  for controller, low, high in ((untrained, 0.1, 0.5), (fitted, 0.85, 1.)):
    log_probs, _ = controller.policy.score(tf.constant([TARGET]))
    assert low < np.exp(log_probs.numpy()).mean() < high
  assert np.mean([agreement(fitted.propose()) for _ in range(50)]) > 0.8


def test_mutation_changes_one_decision_and_only_the_later_ones_it_invalidates():
  rng = np.random.default_rng(0)
  for _ in range(300):
    parent = SPACE.sample_actions(rng)
    child = controllers_lib.mutate(SPACE, parent, rng)
    SPACE.decode(child)
    changed = np.flatnonzero(np.array(child) != np.array(parent))
    assert changed.size >= 1
    for t in changed[1:]:
      assert not SPACE.options(child[:t])[parent[t]]


def test_bad_names_hyperparameters_and_states_are_named():
  with pytest.raises(ValueError, match=r"Unknown controller 'rl'; controllers are \['evolution', "
                                       r"'ppo', 'random'\]"):
    make_controller('rl', SPACE)
  gin.bind_parameter('EvolutionController.tournament_size', 30)
  with pytest.raises(ValueError, match='EvolutionController.tournament_size=30'):
    make_controller('evolution', SPACE)
  state = make_controller('random', SPACE).state()
  with pytest.raises(ValueError, match="controller 'random' cannot be loaded into a 'ppo'"):
    make_controller('ppo', SPACE).load_state(state)
  with pytest.raises(ValueError, match='search space'):
    make_controller('random', SearchSpace(num_cells=8)).load_state(state)
  ppo = make_controller('ppo', SPACE)
  with pytest.raises(ValueError, match='no log-probabilities'):
    ppo.feedback(make_controller('random', SPACE).propose(), 0.5)
  with pytest.raises(ValueError, match='got the reward nan; a reward must be finite'):
    ppo.feedback(ppo.propose(), float('nan'))
