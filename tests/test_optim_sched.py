"""Optimizer parameter groups and the per-step learning-rate schedules, including an exact
resume through state_dict()."""
import argparse
import math

import pytest
import torch
from torch import nn

import models
from config import get_config
from lr_scheduler import build_scheduler
from optimizer import build_optimizer

BASE_LR, WARMUP_LR, MIN_LR = 1e-3, 1e-6, 1e-5
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 5, 10, 2
TOTAL, WARMUP = STEPS_PER_EPOCH * EPOCHS, STEPS_PER_EPOCH * WARMUP_EPOCHS


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.head = nn.Linear(8, 3, bias=False)

    def no_weight_decay(self):
        return {'pos_embed'}

    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}


def make_config(*opts):
    schedule = ['TRAIN.BASE_LR', str(BASE_LR), 'TRAIN.WARMUP_LR', str(WARMUP_LR), 'TRAIN.MIN_LR', str(MIN_LR),
                'TRAIN.EPOCHS', str(EPOCHS), 'TRAIN.WARMUP_EPOCHS', str(WARMUP_EPOCHS)]
    return get_config(argparse.Namespace(opts=schedule + list(opts)))


def group_names(model, optimizer):
    names = {id(p): name for name, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in group['params']) for group in optimizer.param_groups]


def test_adamw_skips_decay_on_1d_bias_and_model_names():
    model = TinyNet()
    optimizer = build_optimizer(make_config('TRAIN.WEIGHT_DECAY', '0.05'), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = group_names(model, optimizer)
    assert decay == ['head.weight', 'proj.weight']
    assert no_decay == ['norm.bias', 'norm.weight', 'pos_embed', 'proj.bias', 'relative_position_bias_table']
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.05, 0.0]
    group = optimizer.param_groups[0]
    assert (group['lr'], group['eps'], group['betas']) == (BASE_LR, 1e-8, (0.9, 0.999))


def test_sgd_and_a_model_without_no_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    optimizer = build_optimizer(make_config('TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.OPTIMIZER.MOMENTUM', '0.8'), model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]['momentum'] == 0.8 and optimizer.param_groups[0]['nesterov']
    assert group_names(model, optimizer) == [['0.weight'], ['0.bias', '1.bias', '1.weight']]


def test_unknown_optimizer_and_scheduler_names():
    config = make_config()
    config.defrost()
    config.TRAIN.OPTIMIZER.NAME = 'lamb'
    config.TRAIN.LR_SCHEDULER.NAME = 'plateau'
    with pytest.raises(ValueError, match="'lamb'"):
        build_optimizer(config, TinyNet())
    with pytest.raises(ValueError, match="'plateau'"):
        build_scheduler(config, torch.optim.SGD(TinyNet().parameters(), lr=0.1), STEPS_PER_EPOCH)


def test_focal_model_no_weight_decay_names_reach_the_no_decay_group():
    config = get_config(argparse.Namespace(opts=[
        'DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', '3', 'MODEL.FOCAL.EMBED_DIM', '8',
        'MODEL.FOCAL.DEPTHS', '[1, 1]', 'MODEL.FOCAL.NUM_HEADS', '[1, 2]', 'MODEL.FOCAL.WINDOW_SIZE', '4',
        'MODEL.FOCAL.FOCAL_POOL', 'fc', 'MODEL.FOCAL.FOCAL_LEVELS', '[2, 2]',
        'MODEL.FOCAL.FOCAL_WINDOWS', '[3, 1]', 'MODEL.FOCAL.EXPAND_SIZES', '[2, 0]', 'MODEL.FOCAL.APE', 'True']))
    model = models.build_model(config)
    decay, no_decay = group_names(model, build_optimizer(config, model))
    assert 'absolute_pos_embed' in no_decay
    assert any('relative_position_bias_table_to_windows' in name for name in no_decay)
    assert all(not name.endswith('.bias') and 'relative_position' not in name for name in decay)
    assert 'layers.0.blocks.0.pool_layers.0.weight' in decay  # a 2-D weight still decays


def lrs(scheduler, optimizer, steps):
    """The learning rate in effect at each optimizer step, stepping as main.py does."""
    values = []
    for step in range(steps):
        values.append(optimizer.param_groups[0]['lr'])
        scheduler.step_update(step + 1)
    return values


def build(*opts):
    config = make_config(*opts)
    optimizer = build_optimizer(config, TinyNet())
    return build_scheduler(config, optimizer, STEPS_PER_EPOCH), optimizer


def warmup_lr(step):
    return WARMUP_LR + (BASE_LR - WARMUP_LR) * step / WARMUP


def cosine_lr(t, span):
    return MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * t / span))


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step'])
def test_every_schedule_warms_up_per_step(name):
    values = lrs(*build('TRAIN.LR_SCHEDULER.NAME', name), TOTAL + 1)
    assert values[:WARMUP] == pytest.approx([warmup_lr(t) for t in range(WARMUP)], rel=1e-9)
    assert all(a < b for a, b in zip(values[:WARMUP], values[1:WARMUP + 1]))


def test_cosine_counts_warmup_inside_the_schedule_as_the_original():
    values = lrs(*build(), TOTAL + 3)
    assert values[WARMUP:] == pytest.approx([cosine_lr(t, TOTAL) for t in range(WARMUP, TOTAL)] + [MIN_LR] * 3)


def test_cosine_with_warmup_prefix_starts_at_the_base_rate():
    values = lrs(*build('TRAIN.LR_SCHEDULER.WARMUP_PREFIX', 'True'), TOTAL)
    assert values[WARMUP:] == pytest.approx([cosine_lr(t, TOTAL - WARMUP) for t in range(TOTAL - WARMUP)])


def test_linear_decays_from_the_end_of_warmup_to_min_lr():
    values = lrs(*build('TRAIN.LR_SCHEDULER.NAME', 'linear'), TOTAL + 1)
    span = TOTAL - WARMUP
    expected = [MIN_LR + (BASE_LR - MIN_LR) * (1 - t / span) for t in range(span)] + [MIN_LR]
    assert values[WARMUP:] == pytest.approx(expected)


def test_step_decays_every_decay_epochs():
    values = lrs(*build('TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '4',
                        'TRAIN.LR_SCHEDULER.DECAY_RATE', '0.1'), TOTAL)
    decay_steps = 4 * STEPS_PER_EPOCH  # counted from step 0, warmup included, as the original
    expected = [BASE_LR * 0.1 ** (t // decay_steps) for t in range(WARMUP, TOTAL)]
    assert values[WARMUP:] == pytest.approx(expected)


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step'])
def test_state_dict_round_trip_resumes_exactly(name):
    scheduler, optimizer = build('TRAIN.LR_SCHEDULER.NAME', name)
    uninterrupted = lrs(scheduler, optimizer, TOTAL)

    scheduler, optimizer = build('TRAIN.LR_SCHEDULER.NAME', name)
    first_part = lrs(scheduler, optimizer, 13)
    saved_scheduler, saved_optimizer = scheduler.state_dict(), optimizer.state_dict()
    # built with another base rate: the saved states, not the new config, decide the schedule
    scheduler, optimizer = build('TRAIN.LR_SCHEDULER.NAME', name, 'TRAIN.BASE_LR', '0.5')
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    rest = []
    for step in range(13, TOTAL):
        rest.append(optimizer.param_groups[0]['lr'])
        scheduler.step_update(step + 1)
    assert first_part + rest == uninterrupted
