"""Fine-tuning on a folder of one's own: layer-wise learning-rate decay (TRAIN.LAYER_DECAY) as timm's
param_groups_layer_decay scales it, kept by the schedulers; frozen stages and the linear probe
(TRAIN.FREEZE) in eval mode and out of the optimizer; a fine-tuning run with both killed mid-epoch and
resumed bit-identical; images of any size; bad folders and values as one line."""
import argparse
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.optim import param_groups_layer_decay
from torchvision.models.detection import MaskRCNN

import main
import models  # noqa: F401  (registers the focal models with timm)
from config import get_config
from data import build_loader
from helpers import (CLASSES, REPO, TIMM_NAME, TIMM_TINY_ARCH, TINY_KWARGS, assert_ok, assert_same_training_state,
                     run_dir, run_main, start_main, stop_when, subprocess_env, write_config,
                     write_image_folder)
from lr_scheduler import build_scheduler
from models.backbone import find_focal, load_pretrained
from models.build import freeze_as_configured
from models.detection import focal_fpn_backbone
from models.focal_transformer import FocalTransformer
from models.segmentation import FocalUPerNet
from optimizer import build_optimizer, layer_scales, parameter_groups


def make_config(*opts, **flags):
    return get_config(argparse.Namespace(opts=list(opts), **flags))


def scales_by_name(model, groups):
    """{parameter name: (lr_scale, weight_decay)} of optimizer parameter groups over `model`."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)]: (group.get('lr_scale', 1.0), group['weight_decay'])
            for group in groups for param in group['params']}


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------
# Focal-T as released (12 blocks); Focal-S's and Focal-B's 24 blocks at a narrow width, with the
# convolutional embedding, absolute position embedding and layer scale (every parameter kind).
LAYER_DECAY_MODELS = {
    'focal-t': dict(),
    'focal-s-narrow': dict(embed_dim=16, depths=(2, 2, 18, 2), num_heads=(1, 1, 2, 2), use_conv_embed=True,
                           ape=True, use_layerscale=True),
}


@pytest.mark.parametrize('variant', sorted(LAYER_DECAY_MODELS))
def test_layer_scales_are_timms_for_every_parameter(variant):
    """The learning-rate scale and weight decay of each parameter, by name, equal those of timm's
    param_groups_layer_decay over the model's group_matcher, with the same exemptions."""
    model = timm.create_model(TIMM_NAME, **LAYER_DECAY_MODELS[variant])
    skip_names, skip_keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
    patterns = list(skip_names) + [f'*{keyword}*' for keyword in skip_keywords]
    for decay in (0.65, 0.9):
        ours = scales_by_name(model, parameter_groups(model, 0.05, skip_names, skip_keywords,
                                                      layer_scales(model, decay)))
        theirs = scales_by_name(model, param_groups_layer_decay(model, 0.05, no_weight_decay_list=patterns,
                                                                layer_decay=decay))
        assert len(ours) == len(theirs) == len(list(model.parameters())) > 200
        assert ours == theirs  # exactly: the same powers of the same decay
    depth = sum(len(stage.blocks) for stage in model.layers)
    assert ours['head.weight'][0] == 1.0 and ours['patch_embed.proj.weight'][0] == decay ** (depth + 1)
    # a stage's downsampling runs after its blocks: it takes its last block's rate
    for index, stage in enumerate(model.layers[:-1]):
        last = len(stage.blocks) - 1
        assert (ours[f'layers.{index}.downsample.proj.weight'][0]
                == ours[f'layers.{index}.blocks.{last}.mlp.fc1.weight'][0]
                < ours[f'layers.{index + 1}.blocks.0.mlp.fc1.weight'][0])


def test_a_detector_or_segmenter_decays_its_backbone_and_trains_its_heads_at_the_full_rate():
    """In a Mask R-CNN and a UPerNet the Focal parameters take the classifier's scales of the same
    name; every other parameter (pyramid, heads, decoder) takes the top scale, 1."""
    classifier = layer_scales(timm.create_model(TIMM_NAME, **TIMM_TINY_ARCH), 0.8)
    detector = MaskRCNN(focal_fpn_backbone(TIMM_NAME, out_channels=16, **TIMM_TINY_ARCH), num_classes=3)
    segmenter = FocalUPerNet(TIMM_NAME, 3, decoder_channels=16, aux_channels=8, img_size=64, **TIMM_TINY_ARCH)
    for model in (detector, segmenter):
        focal_prefix = find_focal(model)[0] + '.'
        scales = layer_scales(model, 0.8)
        focal = {name: scale for name, scale in scales.items() if name.startswith(focal_prefix)}
        assert focal and all(scale == classifier[name[len(focal_prefix):]] for name, scale in focal.items())
        assert min(focal.values()) == 0.8 ** 5  # the stem, below 4 blocks and the top
        assert all(scale == 1.0 for name, scale in scales.items() if name not in focal)


def test_schedules_keep_each_groups_scale():
    """timm's schedulers set every group's rate to the schedule's times its lr_scale, at every step."""
    model = FocalTransformer(**TINY_KWARGS)
    config = make_config('TRAIN.LAYER_DECAY', '0.5', 'TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '1')
    optimizer = build_optimizer(config, model)
    scales = sorted({group['lr_scale'] for group in optimizer.param_groups})
    assert scales == [0.5 ** 3, 0.5 ** 2, 0.5, 1.0]  # stem, two blocks (and the norm), the head
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    schedulers = [build_scheduler(config, optimizer, 10), build_scheduler(config, reference, 10)]
    for step in (0, 5, 10, 25, 39):
        for scheduler in schedulers:
            scheduler.step_update(step)
        rate = reference.param_groups[0]['lr']
        assert [group['lr'] for group in optimizer.param_groups] == \
            pytest.approx([rate * group['lr_scale'] for group in optimizer.param_groups], rel=1e-12)


def test_layer_decay_off_keeps_the_two_groups():
    model = FocalTransformer(**TINY_KWARGS)
    for decay in ('0', '1'):
        groups = build_optimizer(make_config('TRAIN.LAYER_DECAY', decay), model).param_groups
        assert [group['weight_decay'] for group in groups] == [0.05, 0.0]
        assert not any('lr_scale' in group for group in groups)


# ---------------------------------------------------------------------------------------------
# Frozen stages and the linear probe
# ---------------------------------------------------------------------------------------------
def test_frozen_stages_stay_in_eval_mode_and_out_of_the_optimizer():
    """'stages:1': the patch embedding and stage 0 get no gradient, keep their values through a
    training step, run without drop path in training mode, and the optimizer never sees them."""
    torch.manual_seed(0)
    model = FocalTransformer(**dict(TINY_KWARGS, drop_path_rate=0.5, ape=True))
    config = make_config('TRAIN.FREEZE', 'stages:1', 'TRAIN.LAYER_DECAY', '0.7')
    freeze_as_configured(config, model).train()
    frozen = {name for name, _ in model.named_parameters()
              if name.startswith(('patch_embed.', 'absolute_pos_embed', 'layers.0.'))}
    assert frozen and {name for name, param in model.named_parameters() if not param.requires_grad} == frozen
    assert not model.layers[0].training and not model.patch_embed.training and model.layers[1].training
    optimizer = build_optimizer(config, model)
    optimized = {id(param) for group in optimizer.param_groups for param in group['params']}
    assert optimized == {id(param) for name, param in model.named_parameters() if name not in frozen}

    images = torch.randn(4, 3, 32, 32)

    def stage_0():
        return model.forward_intermediates(images, indices=[0], stop_early=True, intermediates_only=True)[0]
    first = stage_0()  # the same twice in training mode: no drop path, and no graph
    assert torch.equal(first, stage_0()) and first.grad_fn is None
    before = {name: param.clone() for name, param in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name in frozen), name
    assert len(optimizer.state_dict()['state']) == len(optimized)


def test_linear_probe_trains_only_the_head_on_features_without_a_graph():
    model = freeze_as_configured(make_config('TRAIN.FREEZE', 'linear-probe'),
                                 FocalTransformer(**dict(TINY_KWARGS, drop_path_rate=0.5))).train()
    assert [name for name, param in model.named_parameters() if param.requires_grad] == ['head.weight', 'head.bias']
    # in training mode only the model, its head and the stages' container (which computes nothing)
    assert [name for name, module in model.named_modules() if module.training] == ['', 'layers', 'head']
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.grad_fn is None  # no backbone graph kept for the backward pass
    assert model(torch.randn(2, 3, 32, 32)).requires_grad


def test_pretrained_classifier_of_other_classes_starts_fresh(tmp_path):
    """A checkpoint that records its classes keeps its classifier for the same classes only."""
    torch.manual_seed(1)
    trained = FocalTransformer(**TINY_KWARGS)
    path = tmp_path / 'trained.pth'
    torch.save({'model': trained.state_dict(), 'classes': ['a', 'b', 'c']}, path)
    for classes, kept in ((['a', 'b', 'c'], True), (['x', 'y', 'z'], False), ([], True)):
        torch.manual_seed(2)
        model = FocalTransformer(**TINY_KWARGS)
        fresh = model.head.weight.clone()
        report = load_pretrained(model, path, classes)
        assert torch.equal(model.head.weight, trained.head.weight if kept else fresh), classes
        assert torch.equal(model.layers[1].blocks[0].mlp.fc1.weight, trained.layers[1].blocks[0].mlp.fc1.weight)
        assert report.count('fresh')[0] == (0 if kept else 2)


# ---------------------------------------------------------------------------------------------
# A fine-tuning run, killed and resumed
# ---------------------------------------------------------------------------------------------
def vary_image_sizes(folder):
    """Re-save some images at other sizes and modes, as a folder of one's own holds them."""
    for split in ('train', 'val'):
        for index, label in enumerate(CLASSES):
            path = os.path.join(folder, split, label, '0.png')
            image = Image.open(path)
            image.resize((20 + 28 * index, 24)).convert('L' if index % 2 else 'RGBA').save(path)


def test_fine_tuning_with_frozen_stages_and_layer_decay_resumes_bit_identical(tmp_path):
    """--pretrained from a checkpoint of other classes, TRAIN.FREEZE stages:1 and TRAIN.LAYER_DECAY on
    images of several sizes: killed (SIGKILL) in epoch 1 and restarted, the run ends as the one never
    interrupted; the frozen weights are the pretrained ones, the classifier is new, the optimizer state
    holds the trained parameters only, and the run records the folder's class names."""
    data = write_image_folder(tmp_path / 'data')
    vary_image_sizes(data)
    torch.manual_seed(1)
    pretrained = FocalTransformer(**TINY_KWARGS)
    torch.save({'model': pretrained.state_dict(), 'classes': ['cat', 'dog', 'fox']}, tmp_path / 'pretrained.pth')
    cfg = write_config(tmp_path / 'tiny.yaml', 'AUG:\n  MIXUP: 0.0\n  CUTMIX: 0.0\n')
    args = ['--cfg', cfg, '--data-path', data, '--pretrained', str(tmp_path / 'pretrained.pth'),
            '--opts', 'TRAIN.FREEZE', 'stages:1', 'TRAIN.LAYER_DECAY', '0.8', 'TRAIN.SAVE_EVERY_STEPS', '2',
            'TRAIN.EPOCHS', '3']
    straight = run_main(tmp_path, args + ['--output', str(tmp_path / 'straight')])
    assert_ok(straight)
    assert 'of them train' in straight.stdout

    killed = run_dir(str(tmp_path / 'killed'))
    process = start_main(tmp_path, args + ['--output', str(tmp_path / 'killed')], log_path=tmp_path / 'killed.log',
                         new_session=True)
    stop_when(process, lambda: os.path.exists(os.path.join(killed, 'ckpt_epoch_1_step_2.pth')),
              lambda: os.killpg(process.pid, signal.SIGKILL))
    assert process.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(killed, 'ckpt_epoch_2.pth'))
    restarted = run_main(tmp_path, args + ['--output', str(tmp_path / 'killed')])
    assert_ok(restarted)
    assert 'continuing at epoch 1 step' in restarted.stdout
    final = os.path.join(run_dir(str(tmp_path / 'straight')), 'ckpt_epoch_2.pth')
    assert_same_training_state(final, os.path.join(killed, 'ckpt_epoch_2.pth'))

    checkpoint = torch.load(final, weights_only=True)
    trained = 0
    for name, value in pretrained.named_parameters():
        frozen = name.startswith(('patch_embed.', 'layers.0.'))
        assert torch.equal(checkpoint['model'][name], value) == frozen, name
        trained += not frozen
    assert len(checkpoint['optimizer']['state']) == trained
    # stage 1 (with the final norm) and the head train; the stem's and stage 0's scales have no group
    assert sorted(group['lr_scale'] for group in checkpoint['optimizer']['param_groups']) == [0.8, 0.8, 1.0, 1.0]
    assert checkpoint['classes'] == list(CLASSES)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the folder, key or value
# ---------------------------------------------------------------------------------------------
def empty_folders(root):
    for split in ('train', 'val'):
        os.makedirs(os.path.join(root, split))


def empty_class(root):
    write_image_folder(root, n_train=2, n_val=1)
    for name in os.listdir(os.path.join(root, 'train', 'square')):
        os.remove(os.path.join(root, 'train', 'square', name))


def val_class_not_in_train(root):
    write_image_folder(root, n_train=2, n_val=1)
    os.rename(os.path.join(root, 'val', 'stripe'), os.path.join(root, 'val', 'zebra'))


def images_without_class_folders(root):
    for split in ('train', 'val'):
        os.makedirs(os.path.join(root, split))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, split, 'loose.png'))


@pytest.mark.parametrize('make, opts, message', [
    (empty_folders, [], r"no images in .*/data/val: expected one sub-folder of images per class$"),
    (images_without_class_folders, [], r"no images in .*/data/val: expected one sub-folder of images per class$"),
    (empty_class, [], r"no images in class folder .*/data/train/square: expected image files \(\.jpg, "),
    (val_class_not_in_train, [], r"the class folders of .*/data/train and .*/data/val differ: val/zebra has no "
                                 r"train/zebra"),
    (None, ['TRAIN.FREEZE', 'stages:3'], r"config key 'TRAIN\.FREEZE' must be 'none', 'stages:K' with "
                                         r"0 <= K <= 2 .* got 'stages:3'"),
    (None, ['TRAIN.FREEZE', 'head'], r"config key 'TRAIN\.FREEZE' must be .* got 'head'"),
    (None, ['TRAIN.LAYER_DECAY', '1.5'], r"config key 'TRAIN\.LAYER_DECAY' must lie in \[0, 1\] .* got 1\.5"),
])
def test_bad_folder_or_value_is_one_line(tmp_path, capsys, make, opts, message):
    data = str(tmp_path / 'data')
    if make is None:
        write_image_folder(data, n_train=2, n_val=1)
    else:
        make(data)
    cfg = write_config(tmp_path / 'tiny.yaml')
    output = str(tmp_path / 'out')
    status = main.cli(['--cfg', cfg, '--data-path', data, '--output', output] + (['--opts', *opts] if opts else []))
    err = capsys.readouterr().err
    assert status == main.EXIT_BAD_INPUT and not os.path.exists(output)
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
    assert re.search(message, err.strip()), err


def test_images_of_any_size_and_mode_load_at_the_input_size(tmp_path):
    data = write_image_folder(tmp_path / 'data', n_train=4, n_val=2)
    vary_image_sizes(data)
    config = make_config('DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '12', 'DATA.NUM_WORKERS', '0', data_path=data)
    train_loader, val_loader, class_names = build_loader(config)
    train_loader.sampler.set_epoch(0)
    images, _, _ = next(iter(train_loader))
    assert images.shape == (12, 3, 32, 32) and class_names == list(CLASSES)
    assert next(iter(val_loader))[0].shape == (6, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# The README's demo of the whole path
# ---------------------------------------------------------------------------------------------
def readme_own_data_demo():
    """The commands of the README's last code block that writes digit folders, joined lines and all."""
    with open(os.path.join(REPO, 'README.md')) as f:
        blocks = [block.split('\n```', 1)[0] for block in f.read().split('```bash\n')[1:]]
    demo = [block for block in blocks if 'python3 -m data.digits' in block][-1]
    return [shlex.split(line) for line in demo.replace('\\\n', ' ').splitlines()]


@pytest.mark.slow  # about 3.5 minutes on 2 cores: three trainings
def test_readme_fine_tuning_demo_reaches_its_accuracies(tmp_path):
    """The README's commands as a user types them, in a fresh folder: the digits 0-4 model fine-tuned on
    5-9 with layer decay reaches at least 95% top-1, a linear probe of its features at least 85% (issue 30)
    with only the classifier trained, the runs record the new folder's class names, and predict.py names
    the held-out sevens and draws each one's attention."""
    commands = readme_own_data_demo()
    assert [command[:2] for command in commands] == ([['python3', '-m']] * 2 + [['python3', 'main.py']] * 3
                                                     + [['python3', 'predict.py']])
    env = dict(subprocess_env(tmp_path), PYTHONPATH=REPO)
    best = {}
    for command in commands:
        command = [sys.executable] + [os.path.join(REPO, word) if word.startswith(('main.py', 'predict.py', 'configs/'))
                                      else word for word in command[1:]]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert_ok(result)
        found = re.findall(r'Max Acc@1: ([0-9.]+)%', result.stdout + result.stderr)
        if found:
            best[os.path.basename(command[command.index('--cfg') + 1])] = float(found[-1])
    # predict.py on the held-out sevens: each named with its top 3, most of them a 7, each with its figure
    named = re.findall(r'^demo_data/digits_5-9/val/7/(\d+)\.png: (\d) ', result.stdout, re.M)
    assert len(named) == 36 and sum(label == '7' for _, label in named) >= 32, result.stdout
    assert sorted(os.listdir(tmp_path / 'maps')) == sorted(f'{name}.{ext}' for name, _ in named
                                                           for ext in ('png', 'safetensors'))
    assert best['focal_micro_digits_0-4.yaml'] > 90
    assert best['focal_micro_digits_own_data.yaml'] >= 95, best
    assert best['focal_micro_digits_linear_probe.yaml'] >= 85, best
    probe = torch.load(tmp_path / 'output/focal_micro_digits_5-9_linear_probe/default/ckpt_best.pth',
                       weights_only=True)
    assert probe['classes'] == ['5', '6', '7', '8', '9']
    assert len(probe['optimizer']['state']) == 2  # the head's weight and bias
