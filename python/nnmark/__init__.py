"""nnmark: watermark neural networks and prove ownership with exact p-values.

White-box marks (Uchida et al. 2017 in weights, DeepSigns 2019 in activations) on a
keyed projection whose matrix is never stored (key spec v1), trigger sets, native
C++/CUDA kernels, safe checkpoint reading.
"""
from ._ext import build_info, get_num_threads, set_num_threads
from .checkpoints import CheckpointError, open_checkpoint
from .keys import DenseKey, KeyFileError, KeyPermissionWarning, WhiteBoxKey, load_key, message_bits
from .ops import dense_projection, keyed_projection, philox4x32_10
from .stats import Verdict, binomial_p_value, binomial_threshold
from .whitebox import Uchida, extract
from .verdicts import calibrate, verify
from .calibration import Calibration, CalibrationError, load_calibration
from .triggers import TriggerKey, TriggerMixer, embed_triggers
from .deepsigns import DeepSigns, DeepSignsKey
from .entangled import embed_entangled, entangled_key
from .scan import scan  # the function; its package stays importable: "from nnmark.scan import expand_paths"
from .robustness import RobustnessReport, robustness_report
from .integrations import PenaltyHook
from .claims import (Certificate, ClaimCheck, ClaimError, Commitment, certify, check_claim, commit, load_certificate,
                     load_commitment, read_stamp, stamp)

__all__ = [
    "build_info", "get_num_threads", "set_num_threads",
    "WhiteBoxKey", "DenseKey", "load_key", "KeyFileError", "KeyPermissionWarning", "message_bits",
    "Uchida", "extract", "verify", "calibrate", "Calibration", "CalibrationError", "load_calibration", "Verdict",
    "binomial_p_value", "binomial_threshold",
    "keyed_projection", "dense_projection", "philox4x32_10", "CheckpointError", "open_checkpoint",
    "TriggerKey", "TriggerMixer", "embed_triggers", "DeepSignsKey", "DeepSigns", "embed_entangled", "entangled_key",
    "scan",
    "robustness_report", "RobustnessReport", "PenaltyHook",
    "commit", "Commitment", "load_commitment", "stamp", "read_stamp", "certify", "Certificate", "load_certificate",
    "check_claim", "ClaimCheck", "ClaimError",
]
from ._version import __version__  # noqa: E402
