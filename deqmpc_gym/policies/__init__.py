"""DEQ-MPC layer, the four variants and the Gymnasium/SB3-facing :class:`DEQMPCPolicy`."""

from deqmpc_gym.policies.config import NetworkConfig, PolicyConfig, Variant
from deqmpc_gym.policies.layer import DEQMPCLayer, LayerOutput, StreamState
from deqmpc_gym.policies.policy import DEQMPCPolicy
from deqmpc_gym.policies.sb3 import SB3ModelShim, attach_eval_callback

__all__ = ["NetworkConfig", "PolicyConfig", "Variant", "DEQMPCLayer", "LayerOutput", "StreamState", "DEQMPCPolicy",
           "SB3ModelShim", "attach_eval_callback"]
