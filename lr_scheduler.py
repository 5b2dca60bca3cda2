# --------------------------------------------------------
# Focal Transformer: learning-rate schedules
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""timm schedulers stepped per optimizer step (``step_update``), with a per-step linear warmup."""
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler


def scaled_learning_rates(config, world_size):
    """The frozen `config` with its rates, given for TRAIN.BASE_BATCH_SIZE images per optimizer step,
    scaled linearly to this run's: batch size x processes x accumulation steps (as the original)."""
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    factor = config.DATA.BATCH_SIZE * world_size * accumulation / float(config.TRAIN.BASE_BATCH_SIZE)
    scaled = config.clone()
    scaled.defrost()
    scaled.TRAIN.BASE_LR *= factor
    scaled.TRAIN.WARMUP_LR *= factor
    scaled.TRAIN.MIN_LR *= factor
    scaled.freeze()
    return scaled


def build_scheduler(config, optimizer, n_iter_per_epoch):
    """The schedule named by TRAIN.LR_SCHEDULER.NAME over TRAIN.EPOCHS epochs.

    ``n_iter_per_epoch`` counts optimizer steps (batches / accumulation steps). The caller
    calls ``scheduler.step_update(num_updates)`` after each optimizer step, where
    ``num_updates`` counts optimizer steps since the start of training, and saves
    ``state_dict()`` / restores ``load_state_dict()`` on resume.

    TRAIN.WARMUP_LR and TRAIN.MIN_LR are used as they stand in the config (main.py has scaled
    them by the total batch: `scaled_learning_rates`). 'linear' decays to MIN_LR, which with the default learning rates is
    the original's floor of 1% of the base rate; 'step' multiplies by DECAY_RATE every
    DECAY_EPOCHS; 'multistep' by DECAY_RATE after each epoch of MILESTONES (the detection
    recipes); 'poly' decays as (1 - t/T) ** POWER to MIN_LR over the whole run, warmup included
    (mmsegmentation's poly with linear warmup). TRAIN.WARMUP_STEPS > 0 counts the warmup in
    optimizer steps instead of TRAIN.WARMUP_EPOCHS. With LR_SCHEDULER.WARMUP_PREFIX False (the original) the warmup steps count
    inside the schedule; with True the schedule starts after them ('linear' always starts after
    them, as the original's did).
    """
    sched = config.TRAIN.LR_SCHEDULER
    num_steps = int(config.TRAIN.EPOCHS * n_iter_per_epoch)
    warmup_steps = config.TRAIN.WARMUP_STEPS or int(config.TRAIN.WARMUP_EPOCHS * n_iter_per_epoch)
    decay_span = num_steps - warmup_steps if sched.WARMUP_PREFIX else num_steps
    warmup = dict(warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=warmup_steps, t_in_epochs=False)

    if sched.NAME == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=max(decay_span, 1), lr_min=config.TRAIN.MIN_LR,
                                 cycle_limit=1, warmup_prefix=sched.WARMUP_PREFIX, **warmup)
    if sched.NAME == 'linear':
        # the original's linear schedule always decays from the end of the warmup
        return PolyLRScheduler(optimizer, t_initial=max(num_steps - warmup_steps, 1), power=1.0,
                               lr_min=config.TRAIN.MIN_LR, cycle_limit=1, warmup_prefix=True, **warmup)
    if sched.NAME == 'step':
        return StepLRScheduler(optimizer, decay_t=max(int(sched.DECAY_EPOCHS * n_iter_per_epoch), 1),
                               decay_rate=sched.DECAY_RATE, warmup_prefix=sched.WARMUP_PREFIX, **warmup)
    if sched.NAME == 'multistep':
        # timm decays once t + 1 passes a milestone; t counts the updates done, so the first
        # update after MILESTONES epochs is the first at the decayed rate, as mmdetection steps
        return MultiStepLRScheduler(optimizer, decay_t=[int(epoch * n_iter_per_epoch) + 1
                                                        for epoch in sched.MILESTONES],
                                    decay_rate=sched.DECAY_RATE,
                                    warmup_prefix=sched.WARMUP_PREFIX, **warmup)
    if sched.NAME == 'poly':
        return PolyLRScheduler(optimizer, t_initial=max(decay_span, 1), power=sched.POWER,
                               lr_min=config.TRAIN.MIN_LR, cycle_limit=1,
                               warmup_prefix=sched.WARMUP_PREFIX, **warmup)
    raise ValueError(f"unknown learning-rate scheduler TRAIN.LR_SCHEDULER.NAME={sched.NAME!r} "
                     f"(use 'cosine', 'linear', 'step', 'multistep' or 'poly')")
