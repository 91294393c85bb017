"""medfl: personalized retrogress-resilient federated learning for medical imaging.

Importing medfl changes nothing in the host process: the `medfl` command and the NVFlare site script set
their process-wide settings themselves (see `medfl.environment`).
"""

__version__ = "0.1.0"
