"""The study script end to end (PVT, one epoch on the tiny dataset): the baseline and the ISTA2 model evaluated
four ways, each under three protocols, with costs and a results file; every run reads the images from memory."""
import json
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_study_runs_and_only_batch_mode_ista2_depends_on_batching(tiny_data, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'cifar_study.py'), '--data', tiny_data,
                          '--models', 'PVTv2-B0', '--in-memory', '--epochs', '1', '--batch-size', '8', '--seeds', '0',
                          '--workers', '0',
                          '--workdir', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    training = (tmp_path / 'pvt' / 'pvt_v2_b0' / 'seed0' / 'train.log').read_text()
    assert 'train: 80 images decoded into memory' in training and 'val: 40 images decoded into memory' in training
    table = out.stdout.split('top-1 (%)')[1].split('evaluation cost')[0]
    rows = {line.split('  ')[0]: [float(x) for x in re.findall(r'([\d.]+) ±', line)]
            for line in table.splitlines() if line.startswith('pvt_v2_b0')}
    ista2 = 'pvt_v2_b0_ista2_bank'
    assert set(rows) == {'pvt_v2_b0', *(f'{ista2} [{r}]' for r in ('batch', 'bank', 'bank, rebuilt', 'off'))}
    assert all(len(r) == 3 for r in rows.values())
    for name in ('pvt_v2_b0', f'{ista2} [bank]', f'{ista2} [bank, rebuilt]', f'{ista2} [off]'):
        assert len(set(rows[name])) == 1, name  # these evaluations cannot depend on the batch
    assert rows[f'{ista2} [batch]'][2] == rows[f'{ista2} [off]'][2]  # at batch 1 there is nobody to align with

    results = json.loads((tmp_path / 'results.json').read_text())['results']['0']
    banked = results[f'{ista2} [bank, rebuilt]']
    assert banked['bank_values'] == 256 * (32 + 64 + 160 + 256) * 2  # bank_size x width, two blocks per stage
    assert banked['rebuild_images'] == 80  # the whole tiny training set: too few to fill the 256-row banks
    assert results['pvt_v2_b0']['parameters'] == banked['parameters'] - 3 * (32 + 64 + 160 + 256) * 2  # q, k, v norms
    for row in results.values():
        assert all(e['seconds'] > 0 and e['peak_memory_mib'] > 0 for e in row['evaluations'].values())
