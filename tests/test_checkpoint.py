"""Checkpoint files: atomic writes, refusal of code-carrying and truncated files, strict key reports."""
import os
import pickle

import pytest
import torch

from common.checkpoint import CheckpointError, load, load_weights, save_atomic


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError('disk full')  # stands in for a write that fails half-way


class Payload:
    def __reduce__(self):
        return (os.system, ('touch ' + os.environ['ISTA2_PAYLOAD_MARK'],))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1, 'w': torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match='disk full'):
        save_atomic({'epoch': 2, 'w': torch.zeros(3), 'bad': Unpicklable()}, path)
    assert load(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # no temporary file left behind


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'w': torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load(path)


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path, monkeypatch):
    mark = tmp_path / 'payload-ran'
    monkeypatch.setenv('ISTA2_PAYLOAD_MARK', str(mark))
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'extra': Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match='refused'):
        load(path)
    assert not mark.exists()


def test_missing_file_and_key_report(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load(tmp_path / 'nope.pth')
    model = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match=r'1 missing: bias.*1 unexpected: scale'):
        load_weights(model, {'weight': torch.zeros(3, 2), 'scale': torch.ones(1)})
