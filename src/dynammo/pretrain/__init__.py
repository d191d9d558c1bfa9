"""Self-supervised pretraining of a backbone without labels: `dynammo pretrain`.

A frozen-backbone method (ACL, DynaMMo, the prompt methods) needs a backbone worth freezing. Where
ImageNet weights may not be used, `dynammo pretrain` trains one on unlabeled in-domain images with

- SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021), or
- MoCo-v2 (Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning",
  arXiv 2003.04297),

and writes `backbone.pt`, a state dict that `dynammo run ... pretrained: RUN/backbone.pt` loads.

One concern per file: config.py (keys, composition), losses.py (the losses, the momentum update,
the queue), augment.py (the two views, batched on the device), models.py (the networks), knn.py
(the k-NN monitor, collapse), data.py (which images), run.py (the training run inside the shared run
session), command.py (`dynammo pretrain`: a new run or `--resume`). The random crops are data/crops.py's.
"""
