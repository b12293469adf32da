"""Teacher models: large, accurate networks to train first and distill from.

Importing this package registers every family with ``compress.registry``.
"""

from teachers import resnet  # noqa: F401  (registers resnet8 ... resnet50)
