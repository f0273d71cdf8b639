"""The search on real Ray: kill -9 of the search, a cluster of two nodes with kill -9 of a
worker, and a training proxy end to end.

The synthetic proxy (no training, a wait per trial) keeps the first two to seconds of trial
time. Each test starts its own Ray in sessions of its own (`_process_group`) and kills them whole
at the end; a test kills only worker processes of its own sessions, so a test beside it (pytest
-n 2) keeps its workers. Deadlines are the suite's SUBPROCESS_TIMEOUT: a backstop against a hang
on a loaded 2-core machine, not a speed check (experiments/trial_overhead.py measures speed).
"""
import contextlib
import json
import math
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from nasfpn_tf.search.journal import Journal, ResultStore
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search.trials import synthetic_curve, synthetic_result
from nasfpn_tf.search import search_dir as search_dir_lib
from training_helpers import (REPO, SUBPROCESS_TIMEOUT, PortTaken, own_session, port_taken,
                              start_on_free_ports)

RAY = str(pathlib.Path(sys.executable).parent / 'ray')
# `ray start` enables token authentication by default; every client of such a cluster says so.
ENV = dict(os.environ, RAY_AUTH_MODE='token', RAY_USAGE_STATS_ENABLED='0')
# What `ray start --head` prints for the other nodes (Ray's Java driver reads the same line).
HEAD_ADDRESS = re.compile(r"ray start --address='([^']+)'")


def _search_command(search_dir, num_trials, *extra, algorithm='random', proxy='synthetic'):
  return [sys.executable, '-m', 'nasfpn_tf.search', f'--search_dir={search_dir}',
          f'--algorithm={algorithm}', f'--proxy={proxy}', f'--num_trials={num_trials}',
          '--num_cells=5', *extra]


def _poll(condition, timeout):
  """The first truthy value of `condition()` within `timeout` s, else None."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(0.2)
  return None


def _wait_for(condition, what, timeout=SUBPROCESS_TIMEOUT):
  value = _poll(condition, timeout)
  assert value, f'timed out after {timeout} s waiting for {what}'
  return value


def _process_group(command, **kwargs):
  """`command` in a session of its own with the Ray environment of these tests, killed whole
  after (`training_helpers.own_session`)."""
  return own_session(command, env=ENV, **kwargs)


def _running_trials(sessions):
  """Pids of the Ray workers of `sessions` (session ids) that are running a trial: Ray titles an
  actor's process `ray::<class>.<method>` while the method runs, and a trial runs in Tune's
  `ImplicitFunc.train` (`ray::ImplicitFunc` when its worker waits between trials)."""
  pids = []
  for process in psutil.process_iter(['pid', 'cmdline']):
    with contextlib.suppress(psutil.Error, ProcessLookupError):
      title = ' '.join(process.info['cmdline'] or [])
      if title.startswith('ray::ImplicitFunc.train') and os.getsid(process.pid) in sessions:
        pids.append(process.pid)
  return pids


def _check_complete(search_dir, num_trials):
  records = Journal(pathlib.Path(search_dir) / search_dir_lib.TRIALS_FILE).read()
  assert [r['trial'] for r in records] == list(range(num_trials))
  trained = [r['key'] for r in records if not r['cached']]
  assert len(trained) == len(set(trained)), 'a key was trained twice'
  return records


def _last_results(search_dir):
  """The last result each trial reported (Tune's result.json of each trial; a trial killed before
  its first report has an empty one)."""
  lines = [path.read_text().splitlines() for path in pathlib.Path(search_dir).glob(
      f'{search_dir_lib.RAY_RESULTS_DIR}/run*/*/result.json')]
  return [json.loads(trial[-1]) for trial in lines if trial]


def _worker_pids(search_dir):
  """The worker processes that ran the search's trials."""
  return {result['pid'] for result in _last_results(search_dir)}


def test_kill_minus_9_of_the_search_loses_and_repeats_nothing(tmp_path):
  # PPO, updating every 4 rewards: the kill also lands between policy updates.
  search_dir = tmp_path / 'search'
  command = _search_command(search_dir, 12, '--max_level=5', '--cpus_per_trial=1',
                            '--synthetic_seconds=1',
                            '--gin_bindings=PPOController.batch_size = 4', algorithm='ppo')
  journal = Journal(search_dir / search_dir_lib.TRIALS_FILE)
  with _process_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as search:
    _wait_for(lambda: len(journal.read()) >= 4 or search.poll() is not None, '4 samples')
    assert search.poll() is None, 'the search ended before it could be killed'
    search.send_signal(signal.SIGKILL)
    search.wait()
  before = journal.read()
  assert 4 <= len(before) < 12, 'the kill must land mid-search'
  stored = {path: path.stat().st_mtime_ns
            for path in (search_dir / search_dir_lib.RESULTS_DIR).glob('*.json')}
  finished = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
  assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
  records = _check_complete(search_dir, 12)
  assert records[:len(before)] == before
  # No stored result was trained again (each is written once, by the training worker).
  assert all(path.stat().st_mtime_ns == mtime for path, mtime in stored.items())
  assert f'Resuming {search_dir}: {len(before)} samples done' in finished.stdout
  # The trials ran at the priority of the test (Ray's default worker niceness is 15).
  results = _last_results(search_dir)
  assert results, 'no trial reported to Tune'
  assert {result['niceness'] for result in results} == {os.nice(0)}
  summary = json.loads(finished.stdout.strip().splitlines()[-1])
  assert summary['num_trials'] == 12
  assert summary['best_reward'] == max(r['reward'] for r in records)


def _listens(session, port):
  """Whether a process of `session` listens on TCP `port`."""
  return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
             and os.getsid(c.pid) == session for c in psutil.net_connections('tcp'))


def _start_head(stack, log_dir, ports):
  """`ray start --head` in a session of its own (entered on `stack`), its Ray Client server on
  ports[0] (the one port Ray does not choose itself), the cluster's port chosen by Ray
  (--port=0) and read back from what it prints. Returns (process, address) once the client
  server listens; PortTaken when its port was taken meanwhile (`--block` then stops the head)."""
  log = log_dir / f'head-{ports[0]}.log'
  command = [RAY, 'start', '--head', '--port=0', f'--ray-client-server-port={ports[0]}',
             '--dashboard-agent-listen-port=0', '--num-cpus=0', '--include-dashboard=false',
             '--disable-usage-stats', '--block']
  with open(log, 'w') as output:
    head = stack.enter_context(_process_group(command, stdout=output, stderr=subprocess.STDOUT))

  def started():
    if head.poll() is not None:
      return 'exited'
    address = HEAD_ADDRESS.search(log.read_text())
    return address and _listens(head.pid, ports[0]) and address.group(1)

  address = _wait_for(started, 'the head node')
  if address == 'exited':
    text = log.read_text()
    if port_taken(text):
      raise PortTaken(ports)
    raise AssertionError(f'ray start --head exited:\n{text[-3000:]}')
  return head, address


def _nodes_up(address):
  """Number of nodes the cluster at `address` reports (0 while `ray status` fails)."""
  with contextlib.suppress(subprocess.TimeoutExpired):
    status = subprocess.run([RAY, 'status', f'--address={address}'], env=ENV,
                            capture_output=True, text=True, timeout=120)
    if status.returncode == 0:
      return status.stdout.count(' node_')
  return 0


def _kill_a_running_trial(sessions, search, errors):
  """SIGKILLs the worker of a running trial of `sessions`, again while Tune records no trial
  error (the trial may end between the listing and the kill); returns the number of kills and
  whether the killed workers had TensorFlow loaded."""
  kills, tensorflow = 0, False
  while not errors() and search.poll() is None:
    assert kills < 3, 'three kills of a running trial and no trial error'
    pid = _wait_for(lambda: _running_trials(sessions) or search.poll() is not None,
                    'a running trial')
    if pid is True:  # the search ended
      break
    with contextlib.suppress(psutil.Error):
      tensorflow |= any('libtensorflow' in m.path for m in psutil.Process(pid[0]).memory_maps())
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid[0], signal.SIGKILL)
      kills += 1
    _poll(lambda: errors() or search.poll() is not None, 120)
  return kills, tensorflow


def test_a_cluster_runs_trials_on_its_joined_node_reuses_a_worker_and_retries_a_killed_one(
    tmp_path):
  # The head has no CPU for trials, the node that joins it one: every trial runs there, one at a
  # time. (With a CPU on each, which nodes get trials is up to timing: Tune moves a trial that
  # waits for a new worker to the idle worker of a finished trial.)
  search_dir = tmp_path / 'search'
  with contextlib.ExitStack() as stack:
    head, address = start_on_free_ports(lambda ports: _start_head(stack, tmp_path, ports))
    _wait_for(lambda: _nodes_up(address) >= 1, 'the head node')
    node = stack.enter_context(_process_group(
        [RAY, 'start', f'--address={address}', '--num-cpus=1', '--dashboard-agent-listen-port=0',
         '--block'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    _wait_for(lambda: _nodes_up(address) >= 2, 'the second node')
    # Up to 3 kills, each failing at most one try of one trial: never more than --max_failures.
    command = _search_command(search_dir, 10, '--max_level=5', '--cpus_per_trial=1',
                              f'--ray_address={address}', '--synthetic_seconds=3',
                              '--max_failures=3')
    with open(tmp_path / 'search.log', 'w') as log:
      search = stack.enter_context(_process_group(command, stdout=log, stderr=subprocess.STDOUT))
      errors = lambda: list(  # noqa: E731
          (search_dir / search_dir_lib.RAY_RESULTS_DIR).glob('run0/*/error.txt'))
      kills, tensorflow = _kill_a_running_trial({head.pid, node.pid}, search, errors)
      search.wait(timeout=SUBPROCESS_TIMEOUT)
    assert search.returncode == 0, (tmp_path / 'search.log').read_text()[-3000:]
  records = _check_complete(search_dir, 10)
  assert errors(), 'no trial saw the killed worker'
  assert not tensorflow, 'a worker of the synthetic proxy loaded TensorFlow'
  assert len({r['node_id'] for r in records if not r['cached']}) == 1
  # One worker runs trial after trial; a killed one is replaced.
  assert len(_worker_pids(search_dir)) <= 1 + kills


def test_asha_stops_weak_trials_and_the_controller_learns_every_reward(tmp_path):
  """--scheduler=asha on the synthetic proxy, whose reward (agreement with a target table,
  rising as sqrt(step)) plainly separates architectures: weak trials stop at a rung, and the
  controller (evolution, whose population keeps each (actions, reward) it was fed) got every
  sample's reward, a stopped one's being its reward at the step where it stopped."""
  search_dir = tmp_path / 'search'
  command = _search_command(search_dir, 10, '--cpus_per_trial=1', '--synthetic_seconds=1',
                            '--scheduler=asha',
                            '--gin_bindings=EvolutionController.population_size = 20',
                            algorithm='evolution')
  finished = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
  assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
  assert 'ASHA: rungs at steps 12, 36 of 100, reduction factor 3' in finished.stdout
  records = _check_complete(search_dir, 10)
  space = SearchSpace(num_cells=5)
  stopped = [r for r in records if r['stopped_at_step'] is not None]
  assert stopped, 'no trial was stopped early'
  for record in records:
    final_ap = synthetic_result(space, record['block_specs'])['ap']
    step = record['stopped_at_step']
    assert step in (None, 12, 36)
    assert record['reward'] == pytest.approx(
        final_ap if step is None else synthetic_curve(final_ap, step), abs=1e-12)
    # What was reported before the end (all of it for a stopped trial), for ASHA's rungs.
    assert [r['steps'] for r in record['result']['reports']] == [12, 36][:(step or 100) // 12]
  # Stopped trials stop waiting: 0.12 or 0.36 of the 1 s a full trial waits.
  assert max(r['seconds'] for r in stopped) < min(
      r['seconds'] for r in records if r['stopped_at_step'] is None)
  state = pickle.loads((search_dir / search_dir_lib.CONTROLLER_FILE).read_bytes())
  assert state['num_records'] == 10
  assert state['state']['population'] == [(tuple(r['actions']), r['reward']) for r in records]
  summary = json.loads(finished.stdout.strip().splitlines()[-1])
  assert summary['num_stopped_early'] == len(stopped)


# A training proxy at its smallest: 24 synthetic images (8 held out) through a frozen random
# backbone (no pretraining), 3 steps per trial at 128 px (tests/test_search_proxy.py's TINY_CPU).
TINY_CPU_PROXY = [
    'build_retinanet.image_size = (128, 128)', 'build_retinanet.num_filters = 16',
    'build_retinanet.num_repeats = 1', 'build_retinanet.head_num_convs = 1',
    'build_retinanet.head_num_filters = 16', 'CpuProxyCache.num_images = 24',
    'CpuProxyCache.num_heldout = 8', 'CpuProxyCache.pretrain_steps = 0',
    'CpuProxy.train_steps = 3', 'CpuProxy.batch_size = 2', 'CpuProxy.warmup_steps = 1',
    'CpuProxy.eval_batch_size = 4']


def test_the_cpu_proxy_trains_each_trial_on_ray_end_to_end(tmp_path):
  """run_search -> proxy.prepare (the cache, in the driver) -> the trainable's run_trial in a
  Ray worker: the journal, the stored results and the rewards all come from trainings."""
  search_dir = tmp_path / 'search'
  # The held-out loss as reward: unlike AP after 3 steps (0 for every candidate), it differs
  # between architectures.
  command = _search_command(search_dir, 2, '--cpus_per_trial=2', '--reward=neg_loss',
                            *(f'--gin_bindings={b}' for b in TINY_CPU_PROXY), proxy='cpu')
  finished = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
  assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
  records = _check_complete(search_dir, 2)
  store = ResultStore(search_dir / search_dir_lib.RESULTS_DIR)
  for record in records:
    result = record['result']
    assert store.get(record['key']) == result  # what the worker stored is what was journaled
    # A training's measurements, not the synthetic proxy's {'ap', 'flops': 0}.
    assert result['steps'] == 3 and math.isfinite(result['final_loss'])
    assert result['flops'] > 0 and result['params'] > 0 and 0.0 <= result['ap'] <= 1.0
    assert set(result['phases']) == {'build', 'train', 'evaluate', 'count'}  # journaled too
    assert record['reward'] == -result['heldout_loss'] < 0  # --reward=neg_loss
    assert record['cached'] or record['seconds'] >= result['seconds'] > 0
  trained = [r for r in records if not r['cached']]
  assert len({r['key'] for r in trained}) == len({r['reward'] for r in trained}) == 2
  # The cache was built once, by the driver (one complete folder, nothing left staging).
  caches = [p for p in (search_dir / search_dir_lib.PROXY_DIR / 'cpu_proxy_cache').iterdir()
            if p.is_dir()]
  assert len(caches) == 1 and '.tmp-' not in caches[0].name, caches
  summary = json.loads(finished.stdout.strip().splitlines()[-1])
  assert summary['num_trials'] == 2
  assert summary['best_reward'] == max(r['reward'] for r in records)
