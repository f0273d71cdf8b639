"""The search on real Ray: kill -9 of the search and of a worker, and a two-node cluster.

The synthetic proxy (no training, a wait per trial) keeps these to seconds of trial time; each
test starts its own Ray in its own process group and kills the whole group at the end.
"""
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from nasfpn_tf.search.journal import Journal

REPO = pathlib.Path(__file__).resolve().parents[1]
RAY = str(pathlib.Path(sys.executable).parent / 'ray')
# `ray start` enables token authentication by default; every client of such a cluster says so.
ENV = dict(os.environ, RAY_AUTH_MODE='token', RAY_USAGE_STATS_ENABLED='0')


def _search_command(search_dir, num_trials, *extra, algorithm='random'):
  return [sys.executable, '-m', 'nasfpn_tf.search', f'--search_dir={search_dir}',
          f'--algorithm={algorithm}', '--proxy=synthetic', f'--num_trials={num_trials}',
          '--num_cells=5', '--max_level=5', '--cpus_per_trial=1', *extra]


def _wait_for(condition, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    time.sleep(0.2)
  raise AssertionError(f'timed out after {timeout} s waiting for {what}')


@contextlib.contextmanager
def _process_group(command, **kwargs):
  """Runs `command` in a new process group (Ray's daemons join it) and kills the group after."""
  process = subprocess.Popen(command, cwd=REPO, env=ENV, start_new_session=True, **kwargs)
  try:
    yield process
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _check_complete(search_dir, num_trials):
  records = Journal(pathlib.Path(search_dir) / 'trials.jsonl').read()
  assert [r['trial'] for r in records] == list(range(num_trials))
  trained = [r['key'] for r in records if not r['cached']]
  assert len(trained) == len(set(trained)), 'a key was trained twice'
  return records


def test_kill_minus_9_of_the_search_loses_and_repeats_nothing(tmp_path):
  # PPO, updating every 4 rewards: the kill also lands between policy updates.
  search_dir = tmp_path / 'search'
  command = _search_command(search_dir, 12, '--synthetic_seconds=1',
                            '--gin_bindings=PPOController.batch_size = 4', algorithm='ppo')
  journal = Journal(search_dir / 'trials.jsonl')
  with _process_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as search:
    _wait_for(lambda: len(journal.read()) >= 4, 120, '4 finished samples')
    search.send_signal(signal.SIGKILL)
    search.wait()
  before = journal.read()
  stored = {path: path.stat().st_mtime_ns for path in (search_dir / 'results').glob('*.json')}
  finished = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=300, check=True)
  records = _check_complete(search_dir, 12)
  assert records[:len(before)] == before
  # No stored result was trained again (each is written once, by the training worker).
  assert all(path.stat().st_mtime_ns == mtime for path, mtime in stored.items())
  assert f'Resuming {search_dir}: {len(before)} samples done' in finished.stdout
  summary = json.loads(finished.stdout.strip().splitlines()[-1])
  assert summary['num_trials'] == 12
  assert summary['best_reward'] == max(r['reward'] for r in records)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_two_node_cluster_runs_trials_on_both_and_retries_a_killed_worker(tmp_path):
  port = _free_port()
  head = [RAY, 'start', '--head', f'--port={port}', '--num-cpus=1', '--include-dashboard=false',
          '--disable-usage-stats', '--block']
  with _process_group(head, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
    address = f'{socket.gethostbyname(socket.gethostname())}:{port}'
    _wait_for(lambda: subprocess.run([RAY, 'status', f'--address={address}'], env=ENV,
                                     capture_output=True).returncode == 0, 60, 'the head node')
    node = [RAY, 'start', f'--address={address}', '--num-cpus=1', '--block']
    with _process_group(node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
      _wait_for(lambda: subprocess.run(
          [RAY, 'status', f'--address={address}'], env=ENV, capture_output=True,
          text=True).stdout.count('node_') >= 2, 60, 'the second node')
      search_dir = tmp_path / 'search'
      command = _search_command(search_dir, 10, f'--ray_address={address}',
                                '--synthetic_seconds=3')
      with _process_group(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as search:
        # Kill one trial's worker process mid-trial; Tune retries the trial.
        _wait_for(lambda: _trial_workers(), 120, 'a running trial')
        os.kill(_trial_workers()[0], signal.SIGKILL)
        output, _ = search.communicate(timeout=300)
      assert search.returncode == 0, output
  records = _check_complete(search_dir, 10)
  assert len({r['node_id'] for r in records if not r['cached']}) == 2, 'not both nodes ran trials'
  errors = list((search_dir / 'ray_results').glob('run0/*/error.txt'))
  assert errors, 'no trial saw the killed worker'


def _trial_workers():
  """Pids of the worker processes running a trial (Ray names them after the trainable)."""
  listing = subprocess.run(['ps', '-eo', 'pid,args'], capture_output=True, text=True).stdout
  return [int(line.split()[0]) for line in listing.splitlines()
          if 'ray::ImplicitFunc' in line or 'ray::train_architecture' in line]
