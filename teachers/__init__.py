"""Teacher models: large, accurate networks to train first and distill from.

Importing this package registers every family with ``compress.registry``.
"""

from teachers import resnet, tv_resnet  # noqa: F401  (registers resnet8 ... resnet50_cifar; resnet18/34/50)
