"""The bank across processes and in the three trainers (each runs the default code path, so these tests
are not repeated per path as those of tests/test_ista2_bank.py are)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import test_cvt_trainer as cvt
from tests import test_pvt_trainer as pvt
from tests import test_swin_trainer as swin
from tests.conftest import run
from tests.test_ista2_bank import build, qkv

WORLD, STEPS, LOCAL_B = 2, 3, 4


def rank_main(rank, init_file, results, across_gpus):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        m = build(eval_align='bank', bank_size=2 * WORLD * LOCAL_B, across_gpus=across_gpus).train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(STEPS):  # different data on each rank
            q, k, v = qkv(LOCAL_B, seed=1000 * rank + step)
            optimizer.zero_grad()
            m(q, k, v).square().mean().backward()
            last = m.v_norm_layer(v).mean(1).detach()  # the representatives queued in this step
            for p in m.parameters():  # as DDP would: the same update on every rank
                dist.all_reduce(p.grad)
            optimizer.step()
        results[rank] = (m.bank.clone(), int(m.bank_count), last)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('across_gpus', [False, True])
def test_two_gloo_ranks_hold_the_same_bank_of_both_ranks_representatives(tmp_path, across_gpus):
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(str(tmp_path / 'init'), results, across_gpus), nprocs=WORLD)
    (bank0, count0, last0), (bank1, count1, last1) = results[0], results[1]
    assert count0 == count1 == STEPS * WORLD * LOCAL_B
    assert torch.equal(bank0, bank1)
    # the last step queued rank 0's representatives, then rank 1's, into the slots after the step before
    start = (STEPS - 1) * WORLD * LOCAL_B % bank0.shape[0]
    torch.testing.assert_close(bank0[start:start + 2 * LOCAL_B], torch.cat([last0, last1]))


BANK_KEYS = {'pvt': 'block1.0.attn.ista2.bank', 'swin': 'layers.0.blocks.0.attn.ista2.bank',
             'cvt': 'stage0.blocks.0.attn.ista2.bank'}
PVT_BANK = ("cfg = dict(model='pvt_v2_b0', ista2_args=dict(qk_norm=True, v_norm=True, ista2_method='v', "
            "attn_inter_topk=1, rep_tkn_type='mean', eval_align='bank', bank_size=16))\n")


IN_MEMORY = {'pvt': ['--data-in-memory'], 'swin': ['DATA.IN_MEMORY', 'True'], 'cvt': ['DATASET.IN_MEMORY', 'True']}


def trainer_cli(name, action, data, tmp_path, checkpoint=None, eval_align='bank', in_memory=False):
    """Run trainer `name`'s own command for `action` ('train' one epoch, 'evaluate' or 'rebuild' `checkpoint`) on its
    small ISTA2 model with eval_align='bank' and 16-row banks (`eval_align` replaces it for evaluation), the images
    decoded into memory first if `in_memory` -> (the output, the path of the checkpoint training writes)."""
    out = str(tmp_path / 'out')
    if name == 'pvt':
        config = tmp_path / 'pvt_v2_b0_bank.py'
        config.write_text(PVT_BANK)
        words = {'train': pvt.train_args(str(config), data, out, 1),
                 'evaluate': ['main.py', '--eval', '--eval-align', eval_align, '--resume', checkpoint],
                 'rebuild': ['main.py', '--rebuild-bank', '--resume', checkpoint]}[action]
        if action != 'train':
            words += ['--config', str(config), '--data-path', data, *pvt.FAST]
        if in_memory:
            words += IN_MEMORY[name]
        return run(pvt.CWD, words), tmp_path / 'out' / 'checkpoint.pth'
    opts = ['MODEL.ISTA2.EVAL_ALIGN', eval_align, 'MODEL.ISTA2.BANK_SIZE', '16']
    if in_memory:
        opts += IN_MEMORY[name]
    if name == 'swin':
        flags = {'train': (), 'evaluate': ('--eval', '--resume', checkpoint),
                 'rebuild': ('--rebuild-bank', '--resume', checkpoint)}[action]
        return (run(swin.CWD, swin.args(swin.ISTA2, data, out, 1, *flags, opts=opts)),
                tmp_path / 'out' / 'swin_tiny_ista2_patch4_window7_224' / 'default' / 'ckpt.pth')
    job, model_file = {'train': ('train', []), 'evaluate': ('test', ['TEST.MODEL_FILE', checkpoint]),
                       'rebuild': ('rebuild_bank', ['TEST.MODEL_FILE', checkpoint])}[action]
    return (cvt.run_sh(job, 1, data, out, 'TRAIN.END_EPOCH', '1', *opts, *model_file),
            tmp_path / 'out' / 'imagenet' / 'cvt-13-ista2-224x224' / 'final_state.pth')


def weights(path):
    state = torch.load(path, weights_only=True)
    return state.get('model', state.get('state_dict', state))


@pytest.mark.parametrize('name', ['pvt', 'swin', 'cvt'])
def test_each_trainer_saves_the_bank_rebuilds_it_by_one_command_and_loads_it_into_any_model(name, tiny_data,
                                                                                            tmp_path):
    _, path = trainer_cli(name, 'train', tiny_data, tmp_path)
    key = BANK_KEYS[name]
    trained = weights(path)
    assert trained[key].shape[0] == 16 and int(trained[key + '_count']) >= 16  # filled by the 80 training images
    evaluated, _ = trainer_cli(name, 'evaluate', tiny_data, tmp_path, str(path))
    assert 'no ISTA2 representative banks' not in evaluated and 'bank is empty' not in evaluated
    assert 'Acc' in evaluated

    source = path.read_bytes()
    rebuilt_path = path.with_name(path.stem + '_bank.pth')
    banks = []
    for in_memory in (False, True):  # the second reads the images decoded into memory: the same pixels
        output, _ = trainer_cli(name, 'rebuild', tiny_data, tmp_path, str(path), in_memory=in_memory)
        assert f'{rebuilt_path}: the banks of' in output and f'{path} is unchanged' in output
        assert ('80 images decoded into memory' in output) == in_memory
        rebuilt = weights(rebuilt_path)
        banks.append({k: v for k, v in rebuilt.items() if '.ista2.bank' in k})
    assert path.read_bytes() == source
    assert all(torch.equal(v, banks[1][k]) for k, v in banks[0].items())  # the same pixels, in one seeded order
    assert {k: v for k, v in rebuilt.items() if '.ista2.bank' not in k}.keys() == \
        {k: v for k, v in trained.items() if '.ista2.bank' not in k}.keys()
    assert all(torch.equal(rebuilt[k], v) for k, v in trained.items() if '.ista2.bank' not in k)
    assert not torch.equal(rebuilt[key], trained[key])  # the frozen final model's view of clean images
    assert int(rebuilt[key + '_count']) >= 16

    evaluated, _ = trainer_cli(name, 'evaluate', tiny_data, tmp_path, str(rebuilt_path), eval_align='batch')
    assert 'ISTA2 representative banks' in evaluated and 'that this model does not use' in evaluated
    assert 'Acc' in evaluated


def test_a_pvt_checkpoint_without_banks_names_the_rebuild_command(tiny_data, tmp_path):
    _, path = trainer_cli('pvt', 'train', tiny_data, tmp_path)
    state = torch.load(path, weights_only=True)
    state['model'] = {k: v for k, v in state['model'].items() if '.ista2.bank' not in k}
    torch.save(state, tmp_path / 'no_bank.pth')
    evaluated, _ = trainer_cli('pvt', 'evaluate', tiny_data, tmp_path, str(tmp_path / 'no_bank.pth'))
    assert 'has no ISTA2 representative banks' in evaluated and '--rebuild-bank' in evaluated
    trainer_cli('pvt', 'rebuild', tiny_data, tmp_path, str(tmp_path / 'no_bank.pth'))
    rebuilt = weights(tmp_path / 'no_bank_bank.pth')
    assert int(rebuilt['block1.0.attn.ista2.bank_count']) == 24  # after 2 batches of 12 the banks were full
    evaluated, _ = trainer_cli('pvt', 'evaluate', tiny_data, tmp_path, str(tmp_path / 'no_bank_bank.pth'))
    assert 'ISTA2 representative banks' not in evaluated and 'Acc' in evaluated


@pytest.mark.parametrize('eval_align', ['bank', 'off', 'batch'])
def test_pvt_evaluation_protocols_agree_on_bank_and_off_models(eval_align, tiny_data, tmp_path):
    """Class order, one shuffled order and batch 1 give the same top-1, top-5 and loss once evaluation ignores the
    companions (and, with these seeds, not with the default 'batch')."""
    config, out = tmp_path / 'pvt.py', tmp_path / 'out'
    config.write_text(PVT_BANK.replace("eval_align='bank'", f'eval_align={eval_align!r}'))
    run(pvt.CWD, pvt.train_args(str(config), tiny_data, str(out), 1))
    accuracy = set()
    for protocol in ('class-order', 'shuffled', 'batch-1'):
        evaluated = run(pvt.CWD, ['main.py', '--eval', '--config', str(config), '--resume', str(out / 'checkpoint.pth'),
                                  '--data-path', tiny_data, '--eval-protocol', protocol, *pvt.FAST])
        accuracy.update(line for line in evaluated.splitlines() if '* Acc@1' in line)
    assert (len(accuracy) == 1) == (eval_align != 'batch'), accuracy  # 'batch': the companions change the loss


def test_a_two_process_rebuild_queues_the_images_one_process_would(tiny_data, tmp_path):
    """Two gloo ranks each run a padded share of the seeded order; the first layer's bank (whose representatives
    precede any alignment) then holds the rows one process queues from the same first 24 images, in another
    order (24-row banks: nothing drops out)."""
    config = tmp_path / 'pvt.py'
    config.write_text(PVT_BANK.replace('bank_size=16', 'bank_size=24'))
    run(pvt.CWD, pvt.train_args(str(config), tiny_data, str(tmp_path / 'out'), 1))
    banks = {}
    for nproc in (1, 2):
        folder = tmp_path / f'rebuilt{nproc}'
        run(pvt.CWD, ['main.py', '--rebuild-bank', '--config', str(config), '--resume', str(tmp_path / 'out' /
                      'checkpoint.pth'), '--data-path', tiny_data, '--output_dir', str(folder), *pvt.FAST], nproc=nproc)
        banks[nproc] = weights(folder / 'checkpoint_bank.pth')
    key = BANK_KEYS['pvt']
    assert int(banks[1][key + '_count']) == int(banks[2][key + '_count']) == 24  # 2 x 12 images, 12 x 2 ranks
    rows = [torch.tensor(sorted(banks[n][key].tolist())) for n in (1, 2)]
    assert not torch.equal(banks[1][key], banks[2][key])
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-5, atol=1e-6)
