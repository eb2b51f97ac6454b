"""Bookkeeping shared by the Triton gated-delta kernels (chunk.py, recurrent.py).

Every kernel sees its input as packed sequences along one flattened token axis: a [B, T, H, D] batch is
B sequences of length T at token offsets 0, T, 2T, ...; a varlen batch ([1, T, H, D] with cu_seqlens) is
len(cu_seqlens) - 1 sequences at the given offsets. Kernels index chunks through `SequenceLayout`, so a
chunk never crosses a sequence boundary and fixed-length and varlen batches run the same code.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


class SequenceLayout(NamedTuple):
    """Sequences and their chunks along the flattened token axis.

    cu_seqlens: int32 [N + 1], token offsets of the N sequences.
    chunk_indices: int32 [NT, 2], (sequence n, chunk c within n) for each of the NT chunks of all sequences.
    chunk_offsets: int32 [N + 1], index of the first chunk of each sequence in [0, NT).
    num_chunks: NT.
    """
    cu_seqlens: torch.Tensor
    chunk_indices: torch.Tensor
    chunk_offsets: torch.Tensor
    num_chunks: int


def sequence_layout(B: int, T: int, cu_seqlens: Optional[torch.Tensor], chunk_size: int,
                    device: torch.device) -> SequenceLayout:
    """Splits every sequence of a [B, T] batch (or of packed `cu_seqlens`, B = 1) into chunks of `chunk_size`."""
    if cu_seqlens is None:
        chunks_per_seq = triton.cdiv(T, chunk_size)
        index = torch.arange(B * chunks_per_seq, device=device, dtype=torch.int32)
        return SequenceLayout(
            cu_seqlens=torch.arange(B + 1, device=device, dtype=torch.int32) * T,
            chunk_indices=torch.stack([index // chunks_per_seq, index % chunks_per_seq], dim=1).contiguous(),
            chunk_offsets=torch.arange(B + 1, device=device, dtype=torch.int32) * chunks_per_seq,
            num_chunks=B * chunks_per_seq)
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    chunks_per_seq = (cu_seqlens.diff() + chunk_size - 1) // chunk_size                # [N]
    chunk_offsets = torch.nn.functional.pad(chunks_per_seq.cumsum(0), (1, 0)).to(torch.int32)
    num_chunks = int(chunk_offsets[-1])                                                 # host sync
    seq = torch.repeat_interleave(torch.arange(len(chunks_per_seq), device=device, dtype=torch.int32),
                                  chunks_per_seq, output_size=num_chunks)
    chunk = torch.arange(num_chunks, device=device, dtype=torch.int32) - chunk_offsets[seq.long()]
    return SequenceLayout(cu_seqlens, torch.stack([seq, chunk], dim=1).contiguous(), chunk_offsets, num_chunks)


@triton.jit
def mma(a, b, DTYPE: tl.constexpr):
    """a @ b with float32 accumulation. DTYPE is the op's input dtype: 16-bit operands run on the tensor cores
    at full rate (float32 intermediates are rounded to DTYPE first); float32 operands run as tf32x3 (three
    tf32 products, ~float32 accuracy; "ieee" compiles to unrolled FMAs, minutes per kernel set)."""
    if DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def state_mma(a, b, DTYPE: tl.constexpr):
    """a @ b for the backward pass's products with the running float32 state gradient (or a float32 [BT, BV]
    operand) b, a in DTYPE. For 16-bit inputs b is split into two 16-bit planes, b = hi + lo (~16 mantissa bits,
    two full-rate dots: more exact than one tf32 dot and faster on Hopper); rounding b to bf16 once per chunk
    would add up over a long sequence, and gradients may lie below float16's normal range (forward_state_mma).
    float32 inputs: tf32x3."""
    if DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        hi = b.to(DTYPE)
        return tl.dot(a.to(DTYPE), (b - hi.to(tl.float32)).to(DTYPE), tl.dot(a.to(DTYPE), hi))


@triton.jit
def forward_state_mma(a, b, DTYPE: tl.constexpr):
    """a @ b for the forward's products with the running float32 state (or a float32 [BT, BV] operand) b. For
    16-bit inputs one float16 dot: both operands rounded to float16 (11 mantissa bits, 8x finer than bf16; bf16
    inputs convert exactly), one dot where state_mma takes two. Forward values are activations of the size of v
    (|x| < 65504 fits, full precision above 6e-5); gradients need not be, so backward keeps state_mma.
    float32 inputs: tf32x3, as mma."""
    if DTYPE == tl.float32:
        return mma(a, b, DTYPE)
    else:
        return mma(a, b, tl.float16)


def block_size(dim: int, cap: int) -> int:
    """Power-of-two block covering `dim` (at least 16, the smallest tl.dot size), capped at `cap`."""
    return min(max(triton.next_power_of_2(dim), 16), cap)


@triton.jit
def sequence_bounds(cu_seqlens, i_n):
    """Start token (int64) and length (int32) of sequence i_n."""
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos, (eos - bos).to(tl.int32)


@triton.jit
def chunk_position(cu_seqlens, chunk_indices, i_t):
    """For global chunk i_t: its sequence i_n, chunk index within the sequence, start token and length."""
    i_n = tl.load(chunk_indices + i_t * 2)
    i_c = tl.load(chunk_indices + i_t * 2 + 1)
    bos, seq_len = sequence_bounds(cu_seqlens, i_n)
    return i_n, i_c, bos, seq_len


@triton.jit
def token_offsets(bos, i_h, seq_len, H: tl.constexpr, D: tl.constexpr, row, col, BR: tl.constexpr,
                  BC: tl.constexpr):
    """Offsets and mask of rows [row, row + BR) x columns [col, col + BC) of head i_h of a [tokens, H, D]
    tensor, within the sequence of length seq_len starting at token bos."""
    o_r = row + tl.arange(0, BR)
    o_c = col + tl.arange(0, BC)
    return (bos + o_r[:, None]) * (H * D) + i_h * D + o_c[None, :], (o_r < seq_len)[:, None] & (o_c < D)[None, :]


@triton.jit
def load_tokens(base, bos, i_h, seq_len, H: tl.constexpr, D: tl.constexpr, row, col, BR: tl.constexpr,
                BC: tl.constexpr):
    """[BR, BC] block of a [tokens, H, D] tensor (see token_offsets); zero outside the sequence."""
    o_x, m_x = token_offsets(bos, i_h, seq_len, H, D, row, col, BR, BC)
    return tl.load(base + o_x, mask=m_x, other=0)


@triton.jit
def load_tokens_t(base, bos, i_h, seq_len, H: tl.constexpr, D: tl.constexpr, row, col, BR: tl.constexpr,
                  BC: tl.constexpr):
    """[BC, BR]: the transpose of load_tokens' block, loaded that way, so that it feeds a dot without a
    transpose in registers (how fla's state passes take K^T)."""
    o_r = row + tl.arange(0, BR)
    o_c = col + tl.arange(0, BC)
    o_x = (bos + o_r[None, :]) * (H * D) + i_h * D + o_c[:, None]
    return tl.load(base + o_x, mask=(o_r < seq_len)[None, :] & (o_c < D)[:, None], other=0)


@triton.jit
def store_tokens(base, b_x, bos, i_h, seq_len, H: tl.constexpr, D: tl.constexpr, row, col, BR: tl.constexpr,
                 BC: tl.constexpr):
    """Stores b_x [BR, BC] into a [tokens, H, D] tensor (see token_offsets), cast to its dtype."""
    o_x, m_x = token_offsets(bos, i_h, seq_len, H, D, row, col, BR, BC)
    tl.store(base + o_x, b_x.to(base.dtype.element_ty), mask=m_x)


@triton.jit
def state_offsets(i_s, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, row, col, BK: tl.constexpr,
                  BV: tl.constexpr):
    """Offsets and mask of rows [row, row + BK) x columns [col, col + BV) of state i_s, head i_h, in a
    [*, H, K, V] tensor."""
    o_k = row + tl.arange(0, BK)
    o_v = col + tl.arange(0, BV)
    o_x = (i_s * H + i_h).to(tl.int64) * (K * V) + o_k[:, None] * V + o_v[None, :]
    return o_x, (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def load_state_stored(base, i_s, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, row, col,
                      BK: tl.constexpr, BV: tl.constexpr):
    """[BK, BV] block of a state (see state_offsets) in the stored dtype: a 16-bit dot operand as it is."""
    o_x, m_x = state_offsets(i_s, i_h, H, K, V, row, col, BK, BV)
    return tl.load(base + o_x, mask=m_x, other=0)


@triton.jit
def load_state(base, i_s, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, row, col, BK: tl.constexpr,
               BV: tl.constexpr):
    """[BK, BV] block of a state (see state_offsets) in float32."""
    return load_state_stored(base, i_s, i_h, H, K, V, row, col, BK, BV).to(tl.float32)


@triton.jit
def store_state(base, b_x, i_s, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, row, col,
                BK: tl.constexpr, BV: tl.constexpr):
    o_x, m_x = state_offsets(i_s, i_h, H, K, V, row, col, BK, BV)
    tl.store(base + o_x, b_x.to(base.dtype.element_ty), mask=m_x)


@triton.jit
def start_state(base, i_n, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, col, BK: tl.constexpr,
                BV: tl.constexpr, GIVEN: tl.constexpr):
    """The [BK, BV] float32 state a sequential pass starts from: sequence i_n's block of `base` if GIVEN
    (an initial state, or the final state's gradient), else zeros."""
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if GIVEN:
        b_S = load_state(base, i_n, i_h, H, K, V, 0, col, BK, BV)
    return b_S


@triton.jit
def state_pass_program(cu_seqlens, chunk_offsets, H: tl.constexpr):
    """For a chunk-state-pass program (V block i_v, sequence x head i_nh): i_v, i_n, i_h, the sequence's start
    token and length, and the index of its first chunk."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = sequence_bounds(cu_seqlens, i_n)
    return i_v, i_n, i_h, bos, seq_len, tl.load(chunk_offsets + i_n)

