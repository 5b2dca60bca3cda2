"""What the one training loop of main.py asks of a task: classification, detection, segmentation.

`build_task(config)` returns the task that config.TASK names. main.py owns everything the tasks
share (processes, seeding, AMP, the optimizer and schedule, DDP, checkpoints and auto-resume,
stop signals, the bad-sample count, TensorBoard, exit statuses); a task owns what differs:

    task = build_task(config)
    data_loader_train, data_loader_val, class_names = task.build_loaders(config)
    config = with_classes(config, class_names)   # config.py: the classes recorded, visibly
    model = task.build_model(config)
    ...
    loss = task.training_loss(train_model, samples, targets, device)   # under autocast
    metrics, headline = task.evaluate(config, model, data_loader_val, device, autocast, logger)

A task is a class with this interface (duck-typed; `tasks.classification.Classification` is the
reference):

  HEADLINE: str
      Name of the metric that decides ckpt_best.pth, e.g. 'Acc@1', 'bbox AP', 'mIoU'. Its best
      value so far is the TrainingState's `max_accuracy` (the checkpoint key keeps that name).
  build_loaders(config) -> (data_loader_train, data_loader_val, class_names)
      Reads and checks the data before anything is written: every problem is a one-line
      `data.DataError` naming the file and what is wrong; leaves the config as it is.
      `class_names`: the names of the data's classes in label order (their number is the number
      of classes the data needs); a set MODEL.NUM_CLASSES smaller than that is a DataError.
      The loaders come from `data.loaders.build_loaders` (one assembly for every task);
      data_loader_train is None under EVAL_MODE. The training loader
        * draws with `data.samplers.ResumableDistributedSampler` (the loop calls
          `sampler.set_epoch(epoch, start_step)`; TRAIN.STEPS_PER_EPOCH makes iteration
          schedules) over `SeededSamples(ReplaceUnreadable(dataset, limit), seed)`, so that each
          sample's augmentation depends on (seed, epoch, index) alone;
        * yields `(samples, targets, replaced)`: `replaced` the (path, error) pairs of the
          unreadable images the bad-sample policy replaced; `len(samples)` is the batch size;
        * has drop_last=True and len() = optimizer steps x accumulation in one epoch.
      The validation loader uses `ShardSampler` (each sample once over all processes) and
      yields `(samples, targets)`.
  build_model(config) -> torch.nn.Module
      The whole model on the CPU, initialised from torch's global generator (seeded by the
      loop), for MODEL.NUM_CLASSES classes (main.py has recorded the data's). A ValueError is
      reported as an invalid model configuration.
  describe(config, model) -> str
      One log line: the model's name and `parameter_count(model)` (and GFLOPs or the number of
      classes where known); `config` is the one with the classes recorded.
  no_weight_decay(model) -> (names, keywords)
      Parameter names (and name substrings) trained without weight decay, in `model`'s own
      names (`models.backbone.no_weight_decay_names` for a dense model); 1-D tensors and biases are
      exempt anyway (`optimizer.parameter_groups`).
  training_loss(model, samples, targets, device) -> scalar tensor
      Move the batch to `device`, run the forward pass of `model` (DDP and/or compiled: call it,
      never its submodules) in training mode and return the loss to minimise. Called inside
      autocast, after the loop has seeded every generator for this step; must draw random numbers
      only from torch/numpy/random (Mixup, drop path, the detector's sampling).
  evaluate(config, model, data_loader, device, autocast, logger) -> (metrics, headline)
      Score the whole validation set exactly, on any number of processes (sums or gathered
      results, never a mean of per-process means); every process returns the same values.
      Logs its summary ending in one ' * ...' line; `metrics` maps short names to floats
      (TensorBoard val/<name>); `headline` is the HEADLINE metric, in percent.

Schedules: TRAIN.EPOCHS epochs of one pass over the data each, or, with TRAIN.STEPS_PER_EPOCH > 0,
epochs of that many batches drawn from the data repeated (an iteration schedule: 160k iterations =
TRAIN.EPOCHS 10 x STEPS_PER_EPOCH 16000, evaluated and saved after each, with step checkpoints
every TRAIN.SAVE_EVERY_STEPS). TRAIN.WARMUP_STEPS > 0 warms up for that many optimizer steps
instead of TRAIN.WARMUP_EPOCHS. Learning rates are given for a total batch of
TRAIN.BASE_BATCH_SIZE images (512 for classification, 16 for the dense recipes) and scaled
linearly to the run's.
"""
import importlib

# config.TASK -> (module in tasks/, class): imported on demand, so that classification never
# imports pycocotools or segmentation_models_pytorch
TASKS = {
    'classification': ('tasks.classification', 'Classification'),
    'detection': ('tasks.detection', 'Detection'),
    'segmentation': ('tasks.segmentation', 'Segmentation'),
}


def parameter_count(model) -> str:
    """'<N> M parameters' of `model`, and how many of them train when TRAIN.FREEZE holds some fixed: for a
    task's `describe`."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return f"{total / 1e6:.2f} M parameters" + (f" ({trained:,} of them train)" if trained < total else '')


def build_task(config):
    """The task config.TASK names."""
    module_name, class_name = TASKS[config.TASK]
    return getattr(importlib.import_module(module_name), class_name)(config)
