"""Temporal fusion layers: one module per layer, all called the same way.

Each option of the ``fusion`` config group builds one of these (a Hydra partial completed with
``d_model``, and for a layer with ``takes_num_tokens`` the backbone's token count), called as
``h, aux = fusion(x [B,T,N,D], valid_mask=[B,T]|[B,T,N]|None)``; padded frames are ignored as if
absent and come back unchanged (joint_mlp: as zeros at their own frame index).

=================  ============================  ==========================================
config             builds                        module
=================  ============================  ==========================================
square (+ablat.)   ``square_fuse`` -> SQuaReFuse  square.py
none               ``NoFusion``                  none.py
temporal_attn      ``TemporalAttention``         temporal_attn.py
temporal_shift     ``TemporalShift``             temporal_shift.py
temporal_conv      ``TemporalConv``              temporal_conv.py
joint_mlp          ``JointMLP``                  joint_mlp.py (the benchmark's token control)
=================  ============================  ==========================================
"""

from squarefuse.models.fusion.joint_mlp import JointMLP
from squarefuse.models.fusion.none import NoFusion
from squarefuse.models.fusion.square import SQuaReFuse, square_fuse
from squarefuse.models.fusion.temporal_attn import TemporalAttention
from squarefuse.models.fusion.temporal_conv import TemporalConv
from squarefuse.models.fusion.temporal_shift import TemporalShift

__all__ = [
    "SQuaReFuse",
    "square_fuse",
    "NoFusion",
    "TemporalAttention",
    "TemporalShift",
    "TemporalConv",
    "JointMLP",
]
