"""Searches a pyramid architecture (paper §3): a controller proposes, Ray Tune trains proxies.

  python -m nasfpn_tf.search --search_dir=runs/search --algorithm=ppo --num_trials=200 \
      --proxy=cpu

On your own images (COCO TFRecords from nasfpn_tf.data.create_coco_tfrecord, DIR/train-*.tfrecord
and DIR/train-label_map.json; see docs/search_own_data.md):

  python -m nasfpn_tf.search --search_dir=runs/search_mine --proxy=cpu --data_dir=DIR \
      --reward=neg_loss

Kill it at any moment and run the same command again: it continues from the search dir's
journal. It prints a line per sample and, at the end, one JSON line (num_trials, num_unique,
best_reward, best_key, num_stopped_early, wall_seconds). DIR/best.gin trains the best
architecture: `python -m nasfpn_tf.main --gin_file=demo.gin --gin_file=DIR/best.gin ...`.

NAS-FPN behind a fixed FPN (docs/pyramids.md): `--pyramids=fpn,searched,searched` trains each
sample stacked twice behind an FPN, each repeat with its own weights.

NAS-FCOS (docs/nasfcos.md#searching-nas-fcos): `--space=nasfcos_fpn` searches FCOS's pyramid,
then `--space=nasfcos_head --fixed_pyramid=PYRAMID_SEARCH_DIR` its head on the pyramid found
(progressive search), with NAS-FCOS's reward, the negative held-out loss, by default.

More architectures per hour: `--scheduler=asha` stops weak trials early (Ray Tune's ASHA on the
held-out reward a trial reports at intermediate steps; docs/search.md#early-stopping-with-asha).
"""
import json

from absl import app, flags

from nasfpn_tf.search import configurables
from nasfpn_tf.search import progressive
from nasfpn_tf.search.controllers import CONTROLLERS
from nasfpn_tf.search import rewards
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search import schedulers
from nasfpn_tf.search.runner import SearchSettings, run_search
from nasfpn_tf.search.trials import PROXIES

FLAGS = flags.FLAGS
flags.DEFINE_string('search_dir', None, 'Where the search keeps its journal '
                    f'({search_dir_lib.TRIALS_FILE}), state and results, and writes '
                    f'{search_dir_lib.BEST_GIN} and {search_dir_lib.PROGRESS_PNG}; an existing one '
                    'is resumed.', required=True)
flags.DEFINE_enum('algorithm', 'ppo', sorted(CONTROLLERS), 'The controller: the paper\'s RNN '
                  'trained with PPO, regularized evolution, or random search.')
flags.DEFINE_integer('num_trials', 100, 'Samples in all, duplicates included (each key is '
                     'trained once); raise it to extend a finished search.')
flags.DEFINE_enum('proxy', 'cpu', list(PROXIES), 'cpu: the embedded data (or --data_dir), '
                  'frozen cached backbone features, ~30 s a trial on 2 cores; e2e: the CPU '
                  'proxy\'s images, split and pretrained backbone, the demo\'s detector trained '
                  'whole from it, backbone included, for 300 steps '
                  '(gin_configs/search_proxy_e2e.gin), minutes a trial on 2 cores, and not '
                  'yet a proxy to search with: its rewards ranked pyramids at random against '
                  'the demo (README, "The proxy task"); paper: '
                  'the paper\'s proxy (ResNet-10, 512 px, 10 epochs) on --data_dir; synthetic: '
                  'no training, agreement with a target table (tests the search machinery).')
flags.DEFINE_string('data_dir', None, '--proxy=cpu or e2e: a folder of your converter records '
                    '(DIR/train-*.tfrecord and DIR/train-label_map.json, from '
                    'nasfpn_tf.data.create_coco_tfrecord --output_prefix=DIR/train), split into '
                    'proxy-train and held-out images; default: the embedded synthetic data. '
                    '--proxy=paper: the proxy_train-*/proxy_heldout-* records of '
                    'nasfpn_tf.search.heldout.')
flags.DEFINE_string('backbone_checkpoint', None, '--proxy=cpu: the frozen backbone (e2e: the '
                    'backbone the trials start from and train on), from a TF '
                    'Model Garden ImageNet checkpoint or a nasfpn_tf model dir (as '
                    'RetinaNetTrainer.init_checkpoint reads it); it must fit '
                    'build_retinanet.backbone. Default: the backbone is pretrained on the '
                    'proxy\'s training images (CpuProxyCache.pretrain_steps).')
flags.DEFINE_string('proxy_dir', None, 'What the trials share, such as the CPU proxy\'s cached '
                    'backbone features; default '
                    f'SEARCH_DIR/{search_dir_lib.PROXY_DIR}. Point searches on the same proxy to '
                    'one dir to build it once.')
flags.DEFINE_enum('reward', None, list(rewards.KINDS), 'ap: the paper\'s; ap_flops: AP x '
                  '(FLOPs/--target_flops)^w, to aim at a compute budget; neg_loss: NAS-FCOS\'s '
                  'negative held-out loss (--proxy=cpu). Default: ap for --space=nasfpn, '
                  'neg_loss for the NAS-FCOS spaces.')
flags.DEFINE_enum('space', 'nasfpn', list(progressive.SPACE_NAMES), 'nasfpn: NAS-FPN pyramids '
                  '(--num_cells, --min_level, --max_level); nasfcos_fpn: NAS-FCOS pyramids of '
                  '--num_cells cells over C3-C5, trained in FCOS with its own head; '
                  'nasfcos_head: NAS-FCOS heads on --fixed_pyramid (progressive search).')
flags.DEFINE_string('fixed_pyramid', None, '--space=nasfcos_head: the pyramid the heads are '
                    'trained on: the search dir of a --space=nasfcos_fpn search (its best pyramid '
                    'that trained to the end), a pyramid key, or a name of nasfcos_specs.SPECS; '
                    'default: the published NAS-FCOS pyramid (nasfcos_fpn).')
flags.DEFINE_integer('proxy_seeds', 1, 'Trainings of each architecture (seeds --seed, '
                     '--seed+1, ...); its reward is their rewards\' mean, and the journal keeps '
                     'each seed\'s result.', lower_bound=1)
flags.DEFINE_float('target_flops', None, 'FLOPs budget of --reward=ap_flops (2 per multiply-add, '
                   'as the paper counts), e.g. 2e9.')
flags.DEFINE_string('init_block_specs', None, 'Start from a known table (a name in '
                    'block_specs.SPECS, e.g. nasfpn): evolution seeds its population with it, PPO '
                    'first fits its policy to it.')
flags.DEFINE_list('pyramids', None, 'Search the NAS-FPN behind fixed pyramids: one entry per '
                  'repeat, first first, a table of block_specs.SPECS (fixed, its own weights) or '
                  'searched (the sample), e.g. fpn,searched,searched: the sample stacked twice '
                  'behind an FPN. Binds build_retinanet.pyramids and .num_repeats for the proxy; '
                  'default: the proxy\'s gin stacks the sample alone.')
flags.DEFINE_integer('num_cells', 7, 'Merging cells per pyramid network (NAS-FCOS: basic '
                     'blocks).')
flags.DEFINE_integer('min_level', 3, 'Finest pyramid level (--space=nasfpn).')
flags.DEFINE_integer('max_level', 7, 'Coarsest pyramid level (--space=nasfpn).')
flags.DEFINE_integer('seed', 0, 'Seeds the controller and every proxy training.')
flags.DEFINE_float('cpus_per_trial', 1, 'CPUs Ray reserves per trial (and TensorFlow\'s thread '
                   'pools in it). 1: as many trials at once as Ray has CPUs, which trains more '
                   'CPU-proxy trials per hour than fewer trials of more threads; each holds '
                   'TensorFlow and the proxy\'s cached features in its own memory.')
flags.DEFINE_float('gpus_per_trial', 0, 'GPUs Ray reserves per trial.')
flags.DEFINE_integer('max_failures', 2, 'Retries of a trial whose worker dies.')
flags.DEFINE_string('ray_address', None, 'Join this Ray cluster (e.g. 10.0.0.1:6379 or auto); '
                    'default: a local Ray on this machine.')
flags.DEFINE_float('synthetic_seconds', 0.0, 'With --proxy=synthetic: seconds each trial waits, '
                   'as if it trained (to try resuming and the cluster quickly).')
flags.DEFINE_enum('scheduler', 'none', list(schedulers.SCHEDULERS), 'none: every trial trains '
                  'to the end; asha: a trial reports its held-out reward at intermediate steps '
                  'and Ray Tune\'s AsyncHyperBandScheduler stops weak ones (--proxy=cpu or '
                  'synthetic, --proxy_seeds=1); its max_t is the proxy\'s train steps '
                  '(CpuProxy.train_steps). A stopped trial\'s reward is its last reported one.')
flags.DEFINE_integer('asha_grace_period', None, '--scheduler=asha: steps before a trial can be '
                     'stopped, the first rung; default ceil(train steps / factor^2).')
flags.DEFINE_float('asha_reduction_factor', None, '--scheduler=asha: each rung keeps the top '
                   '1/factor of the trials that reached it (rungs at grace x factor^k steps); '
                   f'default {schedulers.DEFAULT_REDUCTION_FACTOR:g}.')
flags.DEFINE_integer('report_every', 0, '--scheduler=asha: steps between a trial\'s held-out '
                     'evaluations; 0: at the rungs only (the fewest evaluations).')
flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings for the controller and the proxy, '
                          'e.g. "PPOController.learning_rate = 1e-3".')


def main(argv):
  del argv
  configurables.parse_gin(gin_bindings=FLAGS.gin_bindings)
  space = progressive.make_space(
      FLAGS.space, FLAGS.num_cells, FLAGS.min_level, FLAGS.max_level, FLAGS.fixed_pyramid,
      levels_given=FLAGS['min_level'].present or FLAGS['max_level'].present)
  settings = SearchSettings(
      search_dir=FLAGS.search_dir, algorithm=FLAGS.algorithm, num_trials=FLAGS.num_trials,
      proxy=FLAGS.proxy, reward=FLAGS.reward or progressive.DEFAULT_REWARDS[FLAGS.space],
      target_flops=FLAGS.target_flops, space=space, seed=FLAGS.seed,
      init_block_specs=FLAGS.init_block_specs, gin_bindings=tuple(FLAGS.gin_bindings),
      data_dir=FLAGS.data_dir, backbone_checkpoint=FLAGS.backbone_checkpoint,
      proxy_seeds=FLAGS.proxy_seeds, proxy_dir=FLAGS.proxy_dir,
      cpus_per_trial=FLAGS.cpus_per_trial, gpus_per_trial=FLAGS.gpus_per_trial,
      max_failures=FLAGS.max_failures,
      ray_address=FLAGS.ray_address, synthetic_seconds=FLAGS.synthetic_seconds,
      scheduler=FLAGS.scheduler, asha_grace_period=FLAGS.asha_grace_period,
      asha_reduction_factor=FLAGS.asha_reduction_factor, report_every=FLAGS.report_every,
      pyramids=tuple(FLAGS.pyramids) if FLAGS.pyramids else None)
  print(json.dumps(run_search(settings)), flush=True)


if __name__ == '__main__':
  app.run(main)
