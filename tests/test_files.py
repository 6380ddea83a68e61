"""Files written for later are whole or absent: hhjax.files and its users."""

import pytest

from hhjax import files
from hhjax import workdir as workdir_lib


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('old')
  files.write_atomic(path, 'new')
  files.write_atomic(tmp_path / 'plot.png', b'\x89PNG')
  assert path.read_text() == 'new'
  assert (tmp_path / 'plot.png').read_bytes() == b'\x89PNG'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'plot.png']


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / 'eval.json'
  path.write_text('old')
  with pytest.raises(RuntimeError, match='interrupted'):
    with files.atomic_path(path) as tmp:
      tmp.write_text('half of the new')
      raise RuntimeError('interrupted')
  assert path.read_text() == 'old'
  assert [p.name for p in tmp_path.iterdir()] == ['eval.json']


def test_workdir_files_go_through_the_atomic_writer(tmp_path, monkeypatch):
  written = []
  write = files.write_atomic
  monkeypatch.setattr(files, 'write_atomic', lambda p, d: written.append(p.name) or write(p, d))
  workdir_lib.write_eval(str(tmp_path), {'loss': 0.5})
  assert written == ['eval.json'] and (tmp_path / 'eval.json').exists()
