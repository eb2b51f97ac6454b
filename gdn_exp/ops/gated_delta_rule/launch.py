"""Launch settings of the chunk kernels (`chunk.py`): block sizes, num_warps, num_stages, per kernel and shape.

`ChunkLaunch` holds every table; the op runs with `DEFAULT_LAUNCH`, and the developer tools (`gdn-bench kernels
--sweep`, `gdn_exp.dev.compile_check`, `scripts/sweep_launch.py`) pass other instances to the launch functions
instead of changing these. Timings below: NVIDIA H100, bf16, from the sweeps recorded in docs/perf.md.

Every setting here passes the full GPU check (`gdn-bench check`): Triton 3.6-3.7 can miscompile Hopper wgmma with
N = 16/32 blocks into illegal shared-memory reads or wrong results (triton-lang/triton#11366), seen with 8 warps
or V blocks of 16 in the float32 state kernels, with 2 stages in the output-writing state pass at BV = 32, and
with 1 stage in the two-plane state products (state_mma) in blocks of 16-32.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton

from gdn_exp.ops.backend import sm_count

from .triton_utils import block_size


def _per_chunk():
    """num_warps / num_stages of the per-chunk kernels for 16-bit inputs: the fastest of 4-8 warps x 1-3 stages at
    B8 T4096 H16 D128 (dqk_bwd 1.14 -> 0.89 ms, wy_bwd 0.96 -> 0.55, output_fwd 0.52 -> 0.40 against 4 warps, 1
    stage). The wy kernel does 16-row dots (mma.sync, not wgmma): 1 warp is 2.2x faster than 4 where it solves
    for Ainv, 4 warps where it only applies a stored one."""
    return {"wy_fwd": dict(num_warps=1, num_stages=1),
            "wy_solve": dict(num_warps=1, num_stages=1),        # the wy kernel solving for Ainv alone
            "wy_recompute": dict(num_warps=4, num_stages=1),    # the wy kernel applying a stored Ainv
            "output_fwd": dict(num_warps=4, num_stages=3),      # V blocks of 64, for V < 128 (output_config)
            "dqk_bwd": dict(num_warps=4, num_stages=2),
            "wy_bwd": dict(num_warps=4, num_stages=3),
            "gla": dict(num_warps=4, num_stages=1)}             # chunk_gla.py's elementwise kernels


def _state_passes():
    """The sequential state passes for 16-bit inputs and K <= 128, per V block (`state_pass_config`): each program
    holds a [K, BV] float32 state and walks one sequence, so the V block trades work per program against
    programs per SM. state_fwd: B8 T4096 H16 in blocks of 64 0.36 ms (32: 0.48), B8 T4096 H8 in blocks of 32 at
    3 stages 0.233, B1 T32768 in 16 at 4 stages 0.53."""
    return {"state_fwd": {64: dict(num_warps=4, num_stages=2),
                          32: dict(num_warps=4, num_stages=3),
                          16: dict(num_warps=4, num_stages=4)},
            "state_bwd": {64: dict(num_warps=4, num_stages=1),
                          32: dict(num_warps=4, num_stages=2),
                          16: dict(num_warps=4, num_stages=2)}}


@dataclass(frozen=True)
class ChunkLaunch:
    """The chunk kernels' launch settings (see the module docstring and each field's comment).

    sms: the SM count the state passes plan for; None reads the device's (compile_check plans for an H100
    without one).
    """

    per_chunk: dict = field(default_factory=_per_chunk)
    state: dict = field(default_factory=_state_passes)
    # state_bwd in blocks of 64 where they give each SM at most one program and leave under 10 % of the SMs idle
    # (B8 H8 D128, the model's GDN layer; B4 H16): 3 stages, which pay only without a second program on the SM.
    # B8 T4096 H8 D128 0.54 ms in blocks of 32 -> 0.43; at two programs per SM (B8 T4096 H16) 1 stage stays best.
    # None: no such rule.
    one_wave_state_bwd: Optional[tuple] = (64, dict(num_warps=4, num_stages=3))
    # K > 128 (a [256, BV] state), one (V block, setting) per pass, the fastest that passed the check at B4 T4096
    # H8 D256: state_bwd 1.34 ms at 8 warps (1.49 at 4, blocks of 16), state_fwd 0.53-0.57 at 8 warps; 2 stages
    # at 64 exceed shared memory.
    wide_state: dict = field(default_factory=lambda: {"state_fwd": (64, dict(num_warps=8, num_stages=1)),
                                                      "state_bwd": (64, dict(num_warps=8, num_stages=1))})
    fp32: dict = field(default_factory=lambda: dict(num_warps=4, num_stages=1))  # every kernel, float32 inputs
    # chunk_dqk_bwd_kernel for 16-bit inputs with K > 64: K in blocks of 128 (one program per chunk up to K = 128,
    # so dO, U and dU are read once): 0.85 -> 0.84 ms at B8 T4096 H16 D128, 0.60 -> 0.53 at B4 T4096 H8 D256
    # (blocks of 64 at 8 warps: 1.12 ms at D128, hence not for K <= 64).
    dqk_wide: dict = field(default_factory=lambda: dict(BK=128, BV=64, num_warps=8, num_stages=3))
    # chunk_output_fwd_kernel for 16-bit inputs with V >= 128: V in blocks of 128 (one program per chunk at V = 128,
    # so Q and K are read and Q K^T formed once per chunk): B8 T4096 H16 D128 0.313 -> 0.303 ms against blocks of
    # 64, D256 0.208 -> 0.200.
    output_wide: dict = field(default_factory=lambda: dict(BV=128, num_warps=8, num_stages=3))
    sms: Optional[int] = None

    def replace(self, **changes) -> "ChunkLaunch":
        return dataclasses.replace(self, **changes)

    def launch(self, name: str, dtype: torch.dtype) -> dict:
        """num_warps / num_stages of per-chunk kernel `name` (a key of per_chunk)."""
        return self.fp32 if dtype == torch.float32 else self.per_chunk[name]

    def output_config(self, V: int, dtype: torch.dtype) -> dict:
        """V block and launch settings of chunk_output_fwd_kernel."""
        if dtype != torch.float32 and V >= self.output_wide["BV"]:
            return dict(self.output_wide)
        return dict(BV=block_size(V, 64), **self.launch("output_fwd", dtype))

    def dqk_config(self, K: int, V: int, dtype: torch.dtype) -> dict:
        """Block sizes and launch settings of chunk_dqk_bwd_kernel."""
        if dtype == torch.float32 or K <= 64:
            return dict(BK=block_size(K, 64), BV=block_size(V, 64), **self.launch("dqk_bwd", dtype))
        return dict(self.dqk_wide, BK=block_size(K, self.dqk_wide["BK"]), BV=block_size(V, self.dqk_wide["BV"]))

    def state_pass_config(self, name: str, num_states: int, K: int, V: int, dtype: torch.dtype, device) -> tuple:
        """(V block, launch settings) of state kernel `name` for num_states = sequences x heads. 16-bit inputs
        with K <= 128: the largest block of `state` that still gives every SM a program, else the smallest;
        state_bwd in blocks of 64 also where they fill 90-100 % of the SMs (one_wave_state_bwd). K > 128:
        wide_state. float32 inputs: blocks of at least 32 (16 miscompiled there) and fp32."""
        if dtype == torch.float32:
            return block_size(V, 64 if K <= 64 else 32), self.fp32
        if K > 128:
            BV, config = self.wide_state[name]
            return block_size(V, BV), config
        sms = self.sms or sm_count(device)
        if name == "state_bwd" and self.one_wave_state_bwd is not None:
            one_wave = self.one_wave_state_bwd[0]
            programs = num_states * triton.cdiv(V, one_wave)
            if block_size(V, one_wave) == one_wave and 0.9 * sms <= programs <= sms:
                return self.one_wave_state_bwd
        blocks = [b for b in sorted(self.state[name], reverse=True) if b <= block_size(V, 64)]
        BV = next((b for b in blocks if num_states * triton.cdiv(V, b) >= sms), blocks[-1])
        return BV, self.state[name][BV]

    def forward_writes_output(self, num_states: int, K: int, V: int, dtype: torch.dtype, device) -> bool:
        """Whether inference's state pass writes O itself, rather than storing the chunk states for
        chunk_output_fwd_kernel: float32 inputs in blocks as wide as they go (64 columns, or all of V), since the
        pass recomputes Q K^T in every V block. 16-bit inputs never: with h in one float16 plane the state pass
        and the output kernel are faster at every measured shape (0.36 + 0.31 against 0.80 ms at B8 T4096 H16
        D128, 0.37 + 0.21 against 1.14 at B4 T4096 H8 D256)."""
        wide = self.state_pass_config("state_fwd", num_states, K, V, dtype, device)[0] == block_size(V, 64)
        return dtype == torch.float32 and wide

    def applies_a_inv(self, num_states: int, K: int, V: int, dtype: torch.dtype, device) -> bool:
        """Whether the forward state pass forms U from Ainv, K and V itself (APPLY_AINV) instead of reading W and
        U~ written by the wy kernel: for K <= 128 in blocks of 32-64 columns. At B8 T4096 H16 D128 the solve
        alone takes 0.21 ms against 0.50 with the apply, the pass 0.26 -> 0.29 in blocks of 32 (B8 H8); in
        blocks of 16 (B1 T32768) the pass doubled (0.75 -> 1.44) and at K = 256 it lost 0.04 ms."""
        return K <= 128 and self.state_pass_config("state_fwd", num_states, K, V, dtype, device)[0] >= 32


DEFAULT_LAUNCH = ChunkLaunch()
