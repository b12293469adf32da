"""Student models: small, fast networks to distill into, prune and quantize.

Importing this package registers every family with ``compress.registry``. All are adapted
to small inputs (28-32 px); see each module's docstring.
"""

from students import mobilenetv2, mobilenetv3, shufflenetv2  # noqa: F401  (registers the variants)
