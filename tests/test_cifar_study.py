"""The study script end to end (PVT pair, one epoch on the tiny dataset): three protocols per model."""
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_study_runs_and_the_baseline_does_not_depend_on_batching(tiny_data, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'cifar_study.py'), '--data', tiny_data,
                          '--backbones', 'pvt', '--epochs', '1', '--batch-size', '8', '--seeds', '0', '--workers', '0',
                          '--workdir', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split()[0]: [float(x) for x in re.findall(r'([\d.]+) ±', line)]
            for line in out.stdout.splitlines() if line.startswith('pvt_v2_b0') and '±' in line}
    assert set(rows) == {'pvt_v2_b0', 'pvt_v2_b0_ista2'} and all(len(r) == 3 for r in rows.values())
    assert len(set(rows['pvt_v2_b0'])) == 1  # without ISTA2, batch composition cannot change a prediction
