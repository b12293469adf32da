"""Student models: small, fast networks to distill into, prune and quantize.

Importing this package registers every family with ``compress.registry``. All are adapted
to small inputs (28-32 px), except the tv_* modules: torchvision's architectures with its
module names, for 64-224 px inputs and published weights; see each module's docstring.
"""

from students import mobilenetv2, mobilenetv3, shufflenetv2  # noqa: F401  (registers the variants)
from students import tv_mobilenetv2, tv_mobilenetv3, tv_shufflenetv2  # noqa: F401  (torchvision's, 64-224 px)
