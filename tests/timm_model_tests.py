"""timm's own model tests for the registered ``<name>_ista2`` models, against their base models.

    python -m tests.timm_model_tests [--names BASE ... | --one-per-family] [--workers N] [PYTEST_ARGS ...]

Downloads the source release (sdist) of the installed timm once, keeps its ``tests/`` folder under
``$XDG_CACHE_HOME/ista2/timm-tests/<version>`` (``~/.cache`` without it) and runs its ``tests/test_models.py`` with
this Python against the installed timm, with this file as a pytest plugin (``-p timm_model_tests``) that

- adds, right after every value of a ``model_name`` parametrization that names a base model of
  `common.timm_ista2.REGISTERED` (with or without a timm tag: ``pvt_v2_b0.in1k``), the same value with
  ``<base>_ista2``: every ISTA2 model runs exactly the tests, inputs and size limits of its base model (timm picks
  some tests by model module, which ``<name>_ista2`` is not in);
- deselects everything else: the other ~1300 timm models, and the tests of `NOT_RUN`: three that download weights
  or test images from the Hugging Face hub (``pretrained=True`` of an ISTA2 model loads its base model's weights),
  and timm 1.0.31's ``test_prune_intermediate_layers_contract``, which prunes every model at every feature index
  (half the time of a ``--one-per-family`` run; timm's CI leaves it out; ISTA2 models passed it wherever their
  base model did, ``--one-per-family`` on 2026-12-05);
- writes each test's outcome, and for a base model's test the ISTA2 test it pairs with, to ``--ista2-results``.

Exit status 1 when an ISTA2 model does not pass a test that its base model passes (listed, with the failure's
message); ISTA2 tests that do not pass where the base model's do not pass either are printed as a note. Other
arguments go to pytest (e.g. ``-k forward_fx --tb=long``). The test processes run one thread each
(``OMP_NUM_THREADS=1`` unless set): on a busy machine, two threads per process ran ten times slower. On the 2-core
machine, ``--one-per-family`` (what ``make test`` and ``make test-latest`` run) took 94 s with timm 1.0.11 and
125 s with 1.0.31 alone on it; all 26 models 23 and 18 min shared with other jobs (2026-12-05).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import timm

from common import ista2
from common.timm_ista2 import REGISTERED

HERE = Path(__file__).resolve().parent
# timm tests not run, and why (see the module docstring)
NOT_RUN = {
    **dict.fromkeys(('test_model_inference', 'test_model_load_pretrained', 'test_model_features_pretrained'),
                    'downloads from the Hugging Face hub'),
    'test_prune_intermediate_layers_contract': "slow, left out of timm's own CI too",
}
# --one-per-family: the smallest registered model of each timm family, and PVTv2's linear variant; together they
# run every attention adapter and code path of common.timm_ista2 (the larger models of a family differ in widths
# and depths only)
FAMILIES = ('vit_tiny_patch16_224', 'deit_tiny_patch16_224', 'pvt_v2_b0', 'pvt_v2_b2_li',
            'swin_tiny_patch4_window7_224', 'eva02_tiny_patch14_224', 'beit_base_patch16_224', 'twins_pcpvt_small',
            'twins_svt_small')
NAMES_VARIABLE = 'ISTA2_TIMM_TEST_NAMES'  # the base models to test, for the plugin in each test process


def twin(model_name):
    """'<base>[.tag]' -> '<base>_ista2[.tag]'; None for a model that is not a registered base."""
    base, dot, tag = model_name.partition('.')
    return f'{base}_ista2{dot}{tag}' if base in REGISTERED else None


def _argnames(mark):
    names = mark.args[0]
    return [name.strip() for name in names.split(',')] if isinstance(names, str) else list(names)


def _with_twins(argnames, values):
    """The values of a parametrization over `argnames`, each base model's followed by its ISTA2 twin's (the ISTA2
    names that timm lists itself are left out: they run once, as twins)."""
    at, single = argnames.index('model_name'), len(argnames) == 1
    out = []
    for value in values:
        row = (value,) if single else tuple(value)
        if row[at].partition('.')[0].endswith('_ista2'):
            continue
        out.append(value)
        if twin(row[at]):
            row = (*row[:at], twin(row[at]), *row[at + 1:])
            out.append(row[0] if single else row)
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Add the ISTA2 twins to a test function's model_name parametrization, before pytest reads its marks."""
    marks = getattr(obj, 'pytestmark', None)
    if not callable(obj) or not isinstance(marks, list):
        return
    for i, mark in enumerate(marks):
        if mark.name == 'parametrize' and 'model_name' in _argnames(mark):
            values = _with_twins(_argnames(mark), mark.args[1])
            marks[i] = pytest.mark.parametrize(mark.args[0], values, *mark.args[2:], **mark.kwargs).mark


def _model_name(item):
    callspec = getattr(item, 'callspec', None)
    name = callspec.params.get('model_name') if callspec else None
    return name if isinstance(name, str) else None


def _pairing_key(item):
    """What a test and its twin share: the test function and every parameter, the model named by its base."""
    params = dict(item.callspec.params, model_name=_model_name(item).replace('_ista2', '', 1))
    return item.originalname, repr(sorted(params.items()))


def pytest_addoption(parser):
    parser.addoption('--ista2-results', help='write each test outcome to this JSON file')


def pytest_collection_modifyitems(config, items):
    """Keep the tests of the chosen base models and of their twins, outside NOT_RUN; a base model's test records
    its twin's node id in its user_properties, which travel with its reports."""
    bases = set(os.environ.get(NAMES_VARIABLE, ' '.join(REGISTERED)).split())
    keep, drop = [], []
    for item in items:
        name = _model_name(item)
        base = name and name.partition('.')[0].removesuffix('_ista2')
        (keep if base in bases and item.originalname not in NOT_RUN else drop).append(item)
    twins = {_pairing_key(item): item.nodeid for item in keep if '_ista2' in _model_name(item)}
    for item in keep:
        if '_ista2' not in _model_name(item):
            item.user_properties.append(('ista2_twin', twins.get(_pairing_key(item))))
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


class _Results:
    """In the process that reports (xdist's controller): node id -> outcome over the test's phases, the first
    failure's or skip's message and, for a base model's test, 'ista2_twin'."""

    def __init__(self, path):
        self.path, self.tests = path, {}

    def pytest_runtest_logreport(self, report):
        test = self.tests.setdefault(report.nodeid, {'outcome': 'passed'})
        test.update(dict(report.user_properties))
        if report.failed or (report.skipped and test['outcome'] == 'passed'):
            test['outcome'] = 'failed' if report.failed else 'skipped'
            crash = getattr(report.longrepr, 'reprcrash', None)
            test['message'] = ' '.join(str(crash.message if crash else report.longrepr).split())[:200]

    def pytest_sessionfinish(self):
        Path(self.path).write_text(json.dumps(self.tests))


def pytest_configure(config):
    path = config.getoption('ista2_results')
    if path and not hasattr(config, 'workerinput'):
        config.pluginmanager.register(_Results(path), 'ista2_results')


def timm_tests(version):
    """The folder with tests/ and pyproject.toml (its pytest settings) of timm `version`'s sdist, downloaded and
    unpacked on first use into a temporary folder that is then renamed: an interrupted run leaves no partial
    copy. Not the sdist's timm/ package: the tests import the installed timm."""
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'ista2' / 'timm-tests'
    folder = cache / version
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f'{version}.', dir=cache))
    try:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--disable-pip-version-check', '-q', '--no-deps',
                        '--no-binary', ':all:', '-d', str(partial), f'timm=={version}'], check=True)
        (sdist,) = partial.glob('timm-*.tar.gz')
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inner = Path(member.name.partition('/')[2])
                wanted = inner == Path('pyproject.toml') or inner.parts[:1] == ('tests',)
                if member.isfile() and wanted and '..' not in inner.parts:
                    (partial / inner).parent.mkdir(parents=True, exist_ok=True)
                    (partial / inner).write_bytes(archive.extractfile(member).read())
        sdist.unlink()
        partial.rename(folder)
    except OSError:
        if not folder.is_dir():  # unless another run has just renamed its own copy into place
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def report(tests, seconds, bases):
    """Print the summary; returns the exit status: 1 if an ISTA2 model does not pass a test its base model passes."""
    print(f'\ntimm {timm.__version__} tests/test_models.py: {len(bases)} base models and their ISTA2 twins, '
          f'{len(tests)} tests in {seconds:.0f} s')
    for label, of_base in (('base models', True), ('ISTA2 models', False)):
        counts = Counter(test['outcome'] for test in tests.values() if ('ista2_twin' in test) == of_base)
        print(f'  {label}: ' + ', '.join(f'{counts[outcome]} {outcome}' for outcome in ('passed', 'skipped', 'failed')))
    for reason in dict.fromkeys(NOT_RUN.values()):
        print(f'  not run ({reason}): ' + ', '.join(name for name in NOT_RUN if NOT_RUN[name] == reason))
    missed, notes = [], []
    for nodeid, test in sorted(tests.items()):
        if 'ista2_twin' not in test:
            continue
        twin_test = tests.get(test['ista2_twin'], {'outcome': 'not run'})
        if twin_test['outcome'] != 'passed':
            line = f'  {test["ista2_twin"] or "no ISTA2 twin of " + nodeid}: {twin_test["outcome"]} ' \
                   f'{twin_test.get("message", "")}'.rstrip()
            (missed if test['outcome'] == 'passed' else notes).append(line)
    if notes:
        print(f'note: {len(notes)} ISTA2 tests do not pass where their base model does not pass either:', *notes,
              sep='\n')
    if missed:
        print(f'FAILED: {len(missed)} ISTA2 tests do not pass where their base model passes:', *missed, sep='\n')
        return 1
    print('OK: each ISTA2 model passes every test its base model passes')
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    names = parser.add_mutually_exclusive_group()
    names.add_argument('--names', nargs='+', default=list(REGISTERED), choices=REGISTERED, metavar='BASE',
                       help='base models (of common.timm_ista2.REGISTERED) to test with their twins; default: all')
    names.add_argument('--one-per-family', dest='names', action='store_const', const=list(FAMILIES),
                       help=f'only {", ".join(FAMILIES)}')
    parser.add_argument('--workers', type=int, default=2, help='pytest-xdist processes (1: none); default 2')
    args, pytest_args = parser.parse_known_args(argv)
    start = time.monotonic()
    folder = timm_tests(timm.__version__)
    if ista2.CPU_KERNELS:  # built once here, not in every test process under a test's timeout
        ista2._load_cpu_kernels()
    path = [str(HERE), str(HERE.parent), *filter(None, [os.environ.get('PYTHONPATH')])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **{NAMES_VARIABLE: ' '.join(args.names)})
    env.setdefault('OMP_NUM_THREADS', '1')
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / 'results.json'
        command = [sys.executable, '-m', 'pytest', 'tests/test_models.py', '-p', 'timm_model_tests',
                   '-p', 'no:cacheprovider', f'--ista2-results={results}', '-q', '--tb=line']
        command += ['-n', str(args.workers)] if args.workers > 1 else []
        subprocess.run(command + pytest_args, cwd=folder, env=env)  # its exit status counts base model failures
        if not results.exists():
            print('timm_model_tests: pytest ended without results', file=sys.stderr)
            return 2
        tests = json.loads(results.read_text())
    return report(tests, time.monotonic() - start, args.names)


if __name__ == '__main__':
    sys.exit(main())
