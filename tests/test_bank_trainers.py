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


def trainer_run(name, data, tmp_path):
    """Train the small model of trainer `name` with eval_align='bank' for one epoch, then evaluate the checkpoint;
    -> (checkpoint path, its model state, the evaluation's output)."""
    out = tmp_path / 'out'
    if name == 'pvt':
        config = tmp_path / 'pvt_v2_b0_bank.py'
        config.write_text("cfg = dict(model='pvt_v2_b0', ista2_args=dict(qk_norm=True, v_norm=True, ista2_method='v', "
                          "attn_inter_topk=1, rep_tkn_type='mean', eval_align='bank', bank_size=16))\n")
        run(pvt.CWD, pvt.train_args(str(config), data, str(out), 1))
        path = out / 'checkpoint.pth'
        evaluated = run(pvt.CWD, ['main.py', '--eval', '--config', str(config), '--resume', str(path), '--data-path',
                                  data, *pvt.FAST])
        return path, torch.load(path, weights_only=True)['model'], evaluated
    bank = ['MODEL.ISTA2.EVAL_ALIGN', 'bank', 'MODEL.ISTA2.BANK_SIZE', '16']
    if name == 'swin':
        run(swin.CWD, swin.args(swin.ISTA2, data, str(out), 1, opts=bank))
        path = out / 'swin_tiny_ista2_patch4_window7_224' / 'default' / 'ckpt.pth'
        evaluated = run(swin.CWD, swin.args(swin.ISTA2, data, str(out), 1, '--eval', '--resume', str(path), opts=bank))
        return path, torch.load(path, weights_only=True)['model'], evaluated
    cvt.run_sh('train', 1, data, str(out), 'TRAIN.END_EPOCH', '1', *bank)
    path = out / 'imagenet' / 'cvt-13-ista2-224x224' / 'final_state.pth'
    evaluated = cvt.run_sh('test', 1, data, str(out), 'TEST.MODEL_FILE', str(path), *bank)
    return path, torch.load(path, weights_only=True), evaluated


@pytest.mark.parametrize('name', ['pvt', 'swin', 'cvt'])
def test_each_trainer_saves_the_bank_and_evaluates_with_it(name, tiny_data, tmp_path):
    path, state, evaluated = trainer_run(name, tiny_data, tmp_path)
    key = BANK_KEYS[name]
    assert state[key].shape[0] == 16 and int(state[key + '_count']) >= 16  # filled by the 80 training images
    assert 'no ISTA2 representative banks' not in evaluated and 'bank is empty' not in evaluated
    assert 'Acc' in evaluated


@pytest.mark.parametrize('eval_align', ['bank', 'off', 'batch'])
def test_pvt_evaluation_protocols_agree_on_bank_and_off_models(eval_align, tiny_data, tmp_path):
    """Class order, one shuffled order and batch 1 give the same top-1, top-5 and loss once evaluation ignores the
    companions (and, with these seeds, not with the default 'batch')."""
    config, out = tmp_path / 'pvt.py', tmp_path / 'out'
    config.write_text(f"cfg = dict(model='pvt_v2_b0', ista2_args=dict(qk_norm=True, v_norm=True, ista2_method='v', "
                      f"attn_inter_topk=1, rep_tkn_type='mean', eval_align={eval_align!r}, bank_size=16))\n")
    run(pvt.CWD, pvt.train_args(str(config), tiny_data, str(out), 1))
    accuracy = set()
    for protocol in ('class-order', 'shuffled', 'batch-1'):
        evaluated = run(pvt.CWD, ['main.py', '--eval', '--config', str(config), '--resume', str(out / 'checkpoint.pth'),
                                  '--data-path', tiny_data, '--eval-protocol', protocol, *pvt.FAST])
        accuracy.update(line for line in evaluated.splitlines() if '* Acc@1' in line)
    assert (len(accuracy) == 1) == (eval_align != 'batch'), accuracy  # 'batch': the companions change the loss
