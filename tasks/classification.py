"""Image classification (ImageNet layouts, the digits demo): the task of the released models."""
import time

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter

from data import build_loader
from data.build import build_mixup
from distributed import rank_and_world_size, reduce_sum
from logger import memory_mb
from models import build_model
from tasks import parameter_count


class Classification:
    HEADLINE = 'Acc@1'

    def __init__(self, config):
        self.config = config
        self.mixup_fn = None
        self.criterion = None

    def build_loaders(self, config):
        data_loader_train, data_loader_val, class_names = build_loader(config, *rank_and_world_size())
        if data_loader_train is not None:
            self.mixup_fn = build_mixup(config, config.MODEL.NUM_CLASSES or len(class_names))
        if self.mixup_fn is not None:
            self.criterion = SoftTargetCrossEntropy()  # Mixup/CutMix give soft, smoothed targets
        elif config.MODEL.LABEL_SMOOTHING > 0.:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        return data_loader_train, data_loader_val, class_names

    def build_model(self, config):
        return build_model(config)

    def describe(self, config, model):
        return f"model {config.MODEL.NAME}: {parameter_count(model)}, {model.flops() / 1e9:.2f} GFLOPs"

    def no_weight_decay(self, model):
        return model.no_weight_decay(), model.no_weight_decay_keywords()

    def training_loss(self, model, samples, targets, device):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.config.TRAIN.CHANNELS_LAST:
            samples = samples.contiguous(memory_format=torch.channels_last)
        if self.mixup_fn is not None:
            samples, targets = self.mixup_fn(samples, targets)
        return self.criterion(model(samples), targets)

    def evaluate(self, config, model, data_loader, device, autocast, logger):
        acc1, acc5, loss = validate(config, data_loader, model, device, autocast, logger)
        return {'loss': loss, 'acc1': acc1, 'acc5': acc5}, acc1


@torch.no_grad()
def validate(config, data_loader, model, device, autocast, logger):
    """Loss, top-1 and top-5 over the whole val set: each process scores its shard and the sums
    are added up, so the result is exact for any number of processes."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    # loss sum, top-1 hits, top-5 hits, images
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    batch_time = AverageMeter()
    end = time.time()
    for step, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if config.TRAIN.CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            outputs = model(images)
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.size(1)), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.stack([criterion(outputs, targets), hits[:, :1].sum(), hits.sum(),
                               torch.tensor(targets.size(0), device=device)]).double()
        batch_time.update(time.time() - end)
        end = time.time()
        if step % config.PRINT_FREQ == 0:
            seen = totals[3].clamp(min=1)
            logger.info(f"Test: [{step}/{len(data_loader)}]\t"
                        f"time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                        f"loss {totals[0] / seen:.4f}\tAcc@1 {100 * totals[1] / seen:.3f}\t"
                        f"Acc@5 {100 * totals[2] / seen:.3f}\tmem {memory_mb(device):.0f}MB")
    reduce_sum(totals)
    loss_sum, top1, top5, count = totals.tolist()
    count = max(count, 1)
    acc1, acc5, loss = 100 * top1 / count, 100 * top5 / count, loss_sum / count
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
    logger.info(f" * loss {loss:.6f} over {int(count)} images")
    return acc1, acc5, loss
