"""The README's runbook is what the scripts run, so the two cannot drift apart.

Each README code block preceded by `<!-- tools/cloud_tpu.sh ARGS -->` must be that command's
output (ARGS include --dry-run), and each preceded by `<!-- file: PATH -->` that file.
"""

import pathlib
import re
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r'<!-- (tools/\S+ [^\n]*?|file: \S+) -->\n```\w*\n(.*?)```', re.DOTALL)
SCRIPT = ROOT / 'tools' / 'cloud_tpu.sh'


def _blocks():
  return BLOCK.findall((ROOT / 'README.md').read_text())


def _dry_run(*args, env=None):
  return subprocess.run([str(SCRIPT), '--dry-run', *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=30)


def test_the_readme_shows_the_tpu_runbooks_and_the_slurm_script():
  sources = [source for source, _ in _blocks()]
  assert sum(s.startswith('tools/cloud_tpu.sh') for s in sources) >= 3
  assert 'file: tools/slurm_train.sbatch' in sources


@pytest.mark.parametrize('source,text', _blocks(), ids=[s for s, _ in _blocks()])
def test_readme_block_is_what_the_script_prints(source, text):
  if source.startswith('file: '):
    assert (ROOT / source[len('file: '):]).read_text() == text
    return
  command, *args = shlex.split(source)
  assert '--dry-run' in args   # a block shows commands, never runs them
  proc = subprocess.run([str(ROOT / command), *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == text


def test_parameters_come_from_flags_or_the_environment():
  env = {'PATH': '/usr/bin:/bin', 'HHJAX_PROJECT': 'p', 'HHJAX_ZONE': 'z', 'HHJAX_BUCKET': 'b',
         'HHJAX_TPU_NAME': 'n', 'HHJAX_ACCELERATOR': 'v4-8', 'HHJAX_RUN': 'r'}
  by_env = _dry_run('create', 'train', env=env).stdout
  by_flags = _dry_run('--project=p', '--zone=z', '--bucket=b', '--name=n',
                      '--accelerator-type=v4-8', '--run=r', 'create', 'train',
                      env={'PATH': env['PATH']}).stdout
  assert by_env == by_flags
  assert '--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base --spot' in by_env
  assert '--workdir=gs://b/hhjax/runs/r' in by_env


def test_missing_parameters_and_unknown_steps_are_one_line_errors():
  env = {'PATH': '/usr/bin:/bin'}
  proc = _dry_run('--zone=z', '--bucket=b', 'create', env=env)
  assert proc.returncode == 2 and proc.stderr.startswith('error: the Google Cloud project')
  proc = _dry_run('--project=p', '--zone=z', '--bucket=b', 'launch', env=env)
  assert proc.returncode == 2 and 'unknown argument launch' in proc.stderr
  proc = _dry_run('--project=p', '--zone=z', '--bucket=b', '--accelerator-type=v9-8', 'create',
                  env=env)
  assert proc.returncode == 2 and '--runtime-version' in proc.stderr


def test_the_training_command_is_one_line_that_reports_the_exit_status():
  # The train loop reads each host's status from this line, so the command must print it.
  out = _dry_run('--project=p', '--zone=z', '--bucket=b', 'train').stdout
  assert out.count('\n') == 1 and out.rstrip().endswith('echo "hhjax exit status $?"\'')


# A stand-in for gcloud: the TPU has 2 hosts and is ACTIVE (SUSPENDED, as after a preemption,
# once if $PREEMPTED names a file that exists); each training attempt prints the hosts' exit
# statuses listed in $STATUSES (one attempt per line, e.g. "3 3"), in turn.
FAKE_GCLOUD = r'''#!/bin/bash
echo "gcloud $*" >> "$CALLS"
case "$*" in
  *"queued-resources describe"*)
    if [ -e "$PREEMPTED" ]; then rm "$PREEMPTED"; echo SUSPENDED; else echo ACTIVE; fi ;;
  *"tpu-vm describe"*) echo "10.0.0.1;10.0.0.2" ;;
  *"tpu-vm ssh"*main.py*)
    n=$(grep -c "main.py" "$CALLS")
    for s in $(sed -n "${n}p" "$STATUSES"); do echo "hhjax exit status $s"; done ;;
esac
'''


@pytest.mark.parametrize('attempts,want', [
    (['3 3', '4 4', '', '0 0'], 0),   # preempted, a host lost, connections dropped, finished
    (['3 3', '2 2'], 2),              # a mistake to fix: no more attempts
    (['0'], 2),                       # one host's status missing: not finished...
])
def test_train_runs_again_until_every_host_ends_with_status_0(tmp_path, attempts, want):
  calls = _train_with_fake_gcloud(tmp_path, attempts, want)
  assert calls.count('main.py') == len(attempts)   # ...and after the last attempt, it gives up
  assert 'queued-resources create' not in calls


def test_a_preempted_tpu_is_created_and_installed_again_before_training(tmp_path):
  (tmp_path / 'preempted').touch()
  calls = _train_with_fake_gcloud(tmp_path, ['0 0'], 0).splitlines()
  order = [next(i for i, c in enumerate(calls) if what in c) for what in (
      'queued-resources delete', 'queued-resources create', 'git archive', 'tpu-vm scp',
      'main.py')]
  assert order == sorted(order)


def _train_with_fake_gcloud(tmp_path, attempts, want):
  (tmp_path / 'gcloud').write_text(FAKE_GCLOUD)
  (tmp_path / 'git').write_text('#!/bin/bash\necho "git $*" >> "$CALLS"\n')   # no archive
  for name in ('gcloud', 'git'):
    (tmp_path / name).chmod(0o755)
  (tmp_path / 'statuses').write_text('\n'.join(attempts) + '\n')
  env = {'PATH': f'{tmp_path}:/usr/bin:/bin', 'CALLS': str(tmp_path / 'calls'),
         'STATUSES': str(tmp_path / 'statuses'), 'PREEMPTED': str(tmp_path / 'preempted'),
         'HHJAX_RETRY_PAUSE_S': '0'}
  proc = subprocess.run([str(SCRIPT), '--project=p', '--zone=z', '--bucket=b',
                         f'--attempts={len(attempts)}', 'train'], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=60)
  assert proc.returncode == want, proc.stderr
  if want == 0:
    assert 'Training finished: gs://b/hhjax/runs/default' in proc.stderr
  return (tmp_path / 'calls').read_text()
