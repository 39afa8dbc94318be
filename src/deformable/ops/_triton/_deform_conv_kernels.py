"""Triton kernels of deformable convolution v1/v2; the host side is ``deform_conv.py``.

Layouts every kernel shares (M = N*Ho*Wo output pixels, K = kh*kw taps, G offset groups,
CPG = C_in / G channels per offset group, CG_IN / CG_OUT channels per weight group):

- ``x``: the input, channels-last contiguous [N, H, W, C_in], so that the channels of one
  bilinear neighbour are one contiguous vector;
- ``off`` [N, 2*G*K, Ho, Wo], ``msk`` [N, G*K, Ho, Wo], ``out`` [N, C_out, Ho, Wo] and the offset's
  and mask's gradients (``goff``, ``gmsk``): read and written through strides ``*_SN`` (image),
  ``*_SC`` (channel), ``*_SP`` (flat pixel p = oy*Wo + ox), so NCHW, channels-last and channel slices
  of either (a layer's offsets, cut from its offset-and-mask prediction) are taken as they are;
- ``go`` [N, C_out, Ho, Wo] (the output's gradient): strides ``GO_SN``, ``GO_SC``, ``GO_SP``: NCHW or
  channels-last, whichever the host found loads as vectors;
- ``w``: the weight in GEMM layout. The data kernel's is [groups, CG_IN, K, CG_OUT] (contiguous over
  output channels, its reduction axis; (input channel, tap) rows, so that an NCHW weight gets there by
  one transpose); the forward's on the matrix unit [groups, K, CG_OUT, CG_IN] (contiguous over input
  channels, its reduction axis), on the FMA units (full fp32, fp64) [groups, K, CG_IN, CG_OUT].

All arithmetic on positions, bilinear weights and accumulators is in ``CT`` (float32, or float64 for
float64 tensors); the matrix products take the tensors' own dtype (fp16/bf16/fp32, TF32 when
``PRECISION`` says so) and accumulate in ``CT``; for float64 (``MMA == MMA_SUM``) a product is a
broadcast multiply and a sum instead of ``tl.dot``. ``INDEX64`` makes every index derived from a
pixel or a sample 64-bit, for tensors of 2**31 elements or more.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Integer arguments that only enter index arithmetic: not specialised, so that one compiled kernel
# serves every spatial size. Channel counts and HoWo = Ho*Wo stay specialised: their divisibility by
# 16 lets the compiler vectorise the channel-vector gathers and the NCHW loads and stores.
_SPATIAL_ARGS = ["N", "H", "W", "Wo", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]


MMA_SUM = 0  # broadcast multiply + sum: float64
MMA_DOT = 1  # tl.dot in the operands' dtype
MMA_DOT_FP32 = 2  # tl.dot on operands upcast to fp32: bf16 under the interpreter (see _mma)


@triton.jit
def _mma(a, b, acc, MMA: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` for a [P, Q], b [Q, R], acc [P, R]."""
    if MMA == 0:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif MMA == 1:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # Triton's interpreter multiplies bf16 operands' raw bits; products of bf16 values are exact
        # in fp32, so upcasting first gives the hardware's bf16 x bf16 -> fp32 result.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _pixel_tile(tile, HoWo, Wo, BLOCK: tl.constexpr):
    """Pixel tile ``tile`` -> (image n: scalar, flat spatial index p, oy, ox, p < HoWo).

    Tiles never cross images: p is then a contiguous range, which lets the compiler vectorise the
    NCHW loads and stores along it, and everything indexed by n alone is a scalar.
    """
    tiles_per_image = tl.cdiv(HoWo, BLOCK)
    n = tile // tiles_per_image
    p = (tile % tiles_per_image) * BLOCK + tl.arange(0, BLOCK)
    return n, p, p // Wo, p % Wo, p < HoWo


@triton.jit
def _channel_mask(cols, hi, WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    """``cols < hi`` for a block of BLOCK channels; with ``WHOLE`` (the host knows that every block
    the loops make is whole) a constant true, so that the compiler drops the masks and selects built
    on it (sm_90: 8% of the forward's main-loop instructions at det-c3 fp16)."""
    if WHOLE:
        return tl.full([BLOCK], 1, tl.int1)
    return cols < hi


@triton.jit
def _tap_offsets(
    off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, row_ok, gk, HAS_MASK: tl.constexpr, CT: tl.constexpr
):  # fmt: skip
    """Offsets (dy, dx) and mask value (1 without a mask) of tap ``gk`` (= g*K + k) for a vector of
    pixels whose offsets start at ``off_row`` (= n*OFF_SN + p*OFF_SP) and masks at ``msk_row``."""
    base = off_row + (2 * gk) * OFF_SC
    dy = tl.load(off_ptr + base, mask=row_ok, other=0.0).to(CT)
    dx = tl.load(off_ptr + base + OFF_SC, mask=row_ok, other=0.0).to(CT)
    if HAS_MASK:
        mod = tl.load(msk_ptr + msk_row + gk * MSK_SC, mask=row_ok, other=0.0).to(CT)
    else:
        mod = tl.zeros_like(dy) + 1.0
    return dy, dx, mod


@triton.jit
def _sample_at(
    dy, dx, mod, oy, ox, i, j, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, CT: tl.constexpr
):  # fmt: skip
    """Bilinear set-up of the samples of tap (i, j) displaced by (dy, dx) (see ``_sample``)."""
    y = (oy * stride_h - pad_h + i * dil_h).to(CT) + dy
    x = (ox * stride_w - pad_w + j * dil_w).to(CT) + dx
    # At exactly -1 the sample is 0 all the same (its only in-map neighbours weigh 0), but counting it
    # inside gives its offset the one-sided derivative from inside, as torchvision does: where zero
    # offsets put a padding tap (DCNv2's initial state), the offset still learns.
    inside = (y >= -1.0) & (y < H) & (x >= -1.0) & (x < W)
    # Where y or x is NaN, so is y + x.
    outside = tl.where((y != y) | (x != x), y + x, 0.0)
    ys = tl.where(inside, y, 0.0)
    xs = tl.where(inside, x, 0.0)
    y0f = tl.floor(ys)
    x0f = tl.floor(xs)
    return y0f.to(tl.int32), x0f.to(tl.int32), ys - y0f, xs - x0f, inside, outside, mod


@triton.jit
def _sample(
    off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok, gk, i, j, H, W,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, CT: tl.constexpr,
):  # fmt: skip
    """Bilinear set-up of the samples of tap ``gk`` (= g*K + k, tap (i, j)) for a vector of pixels
    whose offsets start at ``off_row`` (= n*OFF_SN + p*OFF_SP) and masks at ``msk_row``.

    Returns, each a [BLOCK] vector:
        y0, x0: the top-left neighbour (int32, meaningful where ``inside``);
        ly, lx: the fractional parts;
        inside: the sample lies in [-1, H) x [-1, W);
        outside: the sample's value where not inside: 0, or NaN for a NaN position;
        mod: the mask value (1 without a mask).
    Positions outside are replaced by 0 before the floor, so no huge or infinite coordinate is
    ever converted to an integer.
    """
    dy, dx, mod = _tap_offsets(off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, row_ok, gk, HAS_MASK, CT)
    return _sample_at(dy, dx, mod, oy, ox, i, j, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, CT)


@triton.jit
def _corners(n, y0, x0, inside, row_ok, H, W):
    """Flat pixel index (into [N*H*W]) of the top-left neighbour and the in-map masks of all four."""
    ok = inside & row_ok
    ok_y0 = ok & (y0 >= 0)
    ok_y1 = ok & (y0 + 1 < H)
    ok_x0 = x0 >= 0
    ok_x1 = x0 + 1 < W
    r00 = (n * H + y0) * W + x0
    return r00, ok_y0 & ok_x0, ok_y0 & ok_x1, ok_y1 & ok_x0, ok_y1 & ok_x1


@triton.jit
def _bilinear_weights(ly, lx):
    """The four neighbours' bilinear weights (00, 01, 10, 11) from the fractional parts."""
    return (1.0 - ly) * (1.0 - lx), (1.0 - ly) * lx, ly * (1.0 - lx), ly * lx


@triton.jit
def _gather(x_ptr, r00, ok00, ok01, ok10, ok11, cols, cmask, C, W, CT: tl.constexpr):
    """The four neighbours [BLOCK, len(cols)] of each sample, in dtype CT (the input's own keeps them
    compact): channel vectors of the channels-last input (0 where a neighbour is off the map or a
    channel outside cmask)."""
    ptr = x_ptr + r00[:, None] * C + cols[None, :]
    cm = cmask[None, :]
    v00 = tl.load(ptr, mask=ok00[:, None] & cm, other=0.0).to(CT)
    v01 = tl.load(ptr + C, mask=ok01[:, None] & cm, other=0.0).to(CT)
    v10 = tl.load(ptr + W * C, mask=ok10[:, None] & cm, other=0.0).to(CT)
    v11 = tl.load(ptr + (W + 1) * C, mask=ok11[:, None] & cm, other=0.0).to(CT)
    return v00, v01, v10, v11


@triton.jit
def _scatter_corners(gx_ptr, r00, ok00, ok01, ok10, ok11, b00, b01, b10, b11, gm, cols, cm, C, W):
    """Adds ``gm`` [BLOCK, len(cols)] times each neighbour's bilinear weight b.. [BLOCK] to that
    neighbour's channels in the fp32 channels-last accumulator ``gx`` (atomics; ``cm`` [1, len(cols)]
    masks the channels)."""
    ptr = gx_ptr + r00[:, None] * C + cols[None, :]
    tl.atomic_add(ptr, gm * b00[:, None], mask=ok00[:, None] & cm, sem="relaxed")
    tl.atomic_add(ptr + C, gm * b01[:, None], mask=ok01[:, None] & cm, sem="relaxed")
    tl.atomic_add(ptr + W * C, gm * b10[:, None], mask=ok10[:, None] & cm, sem="relaxed")
    tl.atomic_add(ptr + (W + 1) * C, gm * b11[:, None], mask=ok11[:, None] & cm, sem="relaxed")


@triton.jit
def _corner_pairs(r00, ok00, ok01, ok10, ok11, b00, b01, b10, b11, W):
    """The four neighbours as two rows of two, for :func:`_scatter_corner_pairs`: per row (top,
    bottom) the flat pixel index [BLOCK, 2] of its left and right neighbour, their in-map masks and
    their bilinear weights."""
    right = tl.arange(0, 2)[None, :]
    top = r00[:, None] + right
    ok_top = tl.where(right == 0, ok00[:, None], ok01[:, None])
    ok_bottom = tl.where(right == 0, ok10[:, None], ok11[:, None])
    b_top = tl.where(right == 0, b00[:, None], b01[:, None])
    b_bottom = tl.where(right == 0, b10[:, None], b11[:, None])
    return top, top + W, ok_top, ok_bottom, b_top, b_bottom


@triton.jit
def _scatter_corner_pairs(gx_ptr, top, bottom, ok_top, ok_bottom, b_top, b_bottom, gm, cols, cmask, C):
    """:func:`_scatter_corners` with each row of two neighbours (:func:`_corner_pairs`) in one
    [BLOCK, 2, len(cols)] atomic: ``gm`` enters the atomics' layout once, where four separate atomics
    convert each of their four products."""
    g = gm[:, None, :]
    cm = cmask[None, None, :]
    ptr = gx_ptr + top[:, :, None] * C + cols[None, None, :]
    tl.atomic_add(ptr, g * b_top[:, :, None], mask=ok_top[:, :, None] & cm, sem="relaxed")
    ptr = gx_ptr + bottom[:, :, None] * C + cols[None, None, :]
    tl.atomic_add(ptr, g * b_bottom[:, :, None], mask=ok_bottom[:, :, None] & cm, sem="relaxed")


@triton.jit
def _off_the_matrix_layout(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``t`` [BLOCK_M, BLOCK_N] itself, through an identity gather along its columns.

    Triton computes every elementwise operation with a matrix product's result as an operand in the
    matrix unit's layout: the other operands are converted to it, and the results back wherever a
    reduction or a memory operation wants its own layout, each conversion a round trip through shared
    memory with two barriers. A gather's result takes a blocked layout instead, so ``t`` is converted
    once and the elementwise work follows the gathered neighbours' layout."""
    columns = tl.broadcast_to(tl.arange(0, BLOCK_N)[None, :], [BLOCK_M, BLOCK_N])
    return tl.gather(t, columns, 1)


@triton.jit
def _load_grad_out(go_ptr, n, p, HoWo, oc, omask, GO_SN, GO_SC, GO_SP, GO_ALIGN: tl.constexpr):
    """grad_out [BLOCK, len(oc)] of image n, pixels p (a tile of ``_pixel_tile``), output channels oc.

    A channel stride of 1 (channels-last, specialised to a constant) makes the channels contiguous;
    a pixel stride of 1 (NCHW) the pixels. ``GO_ALIGN`` > 1 tells the compiler what the
    specialisation cannot (it only sees divisibility by 16): Ho*Wo, hence every channel's row start and
    the end of the pixel range, is a multiple of GO_ALIGN elements, so an NCHW tile loads as 16-byte
    vectors of pixels.
    """
    rows = n * GO_SN + oc * GO_SC
    inside = p < HoWo
    if GO_ALIGN > 1:
        rows = tl.multiple_of(rows, GO_ALIGN)
        inside = tl.max_constancy(inside, GO_ALIGN)
    mask = inside[:, None] & omask[None, :]
    return tl.load(go_ptr + rows[None, :] + p[:, None] * GO_SP, mask=mask, other=0.0)


@triton.jit
def _columns(
    x_ptr, off_ptr, msk_ptr, n, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok, gk, i, j, H, W, C,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, cols, cmask,
    HAS_MASK: tl.constexpr, CT: tl.constexpr,
):  # fmt: skip
    """Sampled columns [BLOCK, len(cols)] of tap ``gk`` (mask applied); channels outside cmask are 0
    unless the sample is NaN."""
    y0, x0, ly, lx, inside, outside, mod = _sample(
        off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok, gk, i, j, H, W,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CT,
    )  # fmt: skip
    scale = tl.where(inside, 1.0, outside) * mod
    r00, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, row_ok, H, W)
    v00, v01, v10, v11 = _gather(x_ptr, r00, ok00, ok01, ok10, ok11, cols, cmask, C, W, CT)
    return (
        ((1.0 - ly) * (1.0 - lx) * scale)[:, None] * v00
        + ((1.0 - ly) * lx * scale)[:, None] * v01
        + (ly * (1.0 - lx) * scale)[:, None] * v10
        + (ly * lx * scale)[:, None] * v11
    )


@triton.jit
def _blend_factors(n, row_ok, H, W, y0, x0, ly, lx, inside, outside, mod):
    """From a ``_sample`` set-up: the four neighbours' blend factors [BLOCK] (bilinear weight x mask;
    NaN for a NaN position), the top-left neighbour's flat pixel and the four in-map masks."""
    scale = tl.where(inside, 1.0, outside) * mod
    r00, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, row_ok, H, W)
    return (
        (1.0 - ly) * (1.0 - lx) * scale, (1.0 - ly) * lx * scale, ly * (1.0 - lx) * scale, ly * lx * scale,
        r00, ok00, ok01, ok10, ok11,
    )  # fmt: skip


@triton.jit
def _fwd_weight_tile(w_ptr, wk, cols, cmask, c_lo, CG_IN, CG_OUT, ocols, omask, W_K_MAJOR: tl.constexpr):
    """The forward's weight tile [len(cols), BLOCK_N] of weight row block ``wk`` (= weight group x
    taps + tap), zero outside cmask x omask."""
    if W_K_MAJOR:  # the tile's reduction axis contiguous: the operand TF32's wgmma needs
        wcol = (wk * CG_OUT + ocols) * CG_IN
        wptr = w_ptr + wcol[None, :] + (cols - c_lo)[:, None]
    else:
        wrow = wk * CG_IN + (cols - c_lo)
        wptr = w_ptr + wrow[:, None] * CG_OUT + ocols[None, :]
    return tl.load(wptr, mask=cmask[:, None] & omask[None, :], other=0.0)


@triton.jit
def _blend_dot(
    acc, w00, w01, w10, w11, v00, v01, v10, v11, wt, cmask,
    MMA: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr, LOW_BLEND: tl.constexpr,
):  # fmt: skip
    """``acc`` [BLOCK_M, BLOCK_N] plus the blended columns (neighbours v.. [BLOCK_M, BLOCK_K] times
    their factors w.. [BLOCK_M]) times the weight tile ``wt`` [BLOCK_K, BLOCK_N]. ``LOW_BLEND``: the
    blend in the neighbours' own 16-bit dtype (packed half-precision arithmetic, as torchvision's
    kernels blend), not in CT: no conversions of the neighbours to fp32 and back."""
    if LOW_BLEND:
        lt = v00.dtype
        a = (
            w00.to(lt)[:, None] * v00 + w01.to(lt)[:, None] * v01
            + w10.to(lt)[:, None] * v10 + w11.to(lt)[:, None] * v11
        )  # fmt: skip
    else:
        a = (
            w00[:, None] * v00.to(CT) + w01[:, None] * v01.to(CT)
            + w10[:, None] * v10.to(CT) + w11[:, None] * v11.to(CT)
        )  # fmt: skip
    # Padding channels must be exact zeros: a NaN sample times a zero-padded weight row would
    # otherwise leak into every output channel.
    a = tl.where(cmask[None, :], a, 0.0)
    return _mma(a.to(wt.dtype), wt, acc, MMA, PRECISION)


@triton.jit
def _fwd_step_setup(
    dy, dx, dm, n, oy, ox, row_ok, live, i, j, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CT: tl.constexpr,
):  # fmt: skip
    """A flat-loop step's samples, tap (i, j) displaced by (dy, dx) with mask value dm: the blend
    factors w.. [BLOCK_M], the top-left neighbour's flat pixel and the four in-map masks (all false
    where ``live``, a scalar, is false)."""
    y0, x0, ly, lx, inside, outside, mod = _sample_at(
        dy, dx, dm, oy, ox, i, j, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, CT
    )
    # tl.where, not &: the interpreter gives `bool tensor & scalar` an integer dtype (float once
    # 64-bit), which breaks the masks built on it.
    return _blend_factors(n, tl.where(live, row_ok, False), H, W, y0, x0, ly, lx, inside, outside, mod)


@triton.jit
def _fwd_step_loads(
    x_ptr, w_ptr, r00, ok00, ok01, ok10, ok11, live, wk, c0, seg_hi, c_lo, W, C, CG_IN, CG_OUT, ocols, omask,
    W_K_MAJOR: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A flat-loop step's loads for channels [c0, seg_hi) of samples set up by :func:`_fwd_step_setup`:
    the four neighbours v.. [BLOCK_M, BLOCK_K] in the input's dtype, the weight tile of row block
    ``wk`` (zero where ``live`` is false) and the channel mask."""
    cols = c0 + tl.arange(0, BLOCK_K)
    cmask = _channel_mask(cols, seg_hi, WHOLE_BLOCKS, BLOCK_K)
    v00, v01, v10, v11 = _gather(
        x_ptr, r00, ok00, ok01, ok10, ok11, cols, cmask, C, W, x_ptr.dtype.element_ty
    )
    wt = _fwd_weight_tile(
        w_ptr, wk, cols, tl.where(live, cmask, False), c_lo, CG_IN, CG_OUT, ocols, omask, W_K_MAJOR
    )
    return v00, v01, v10, v11, wt, cmask


@triton.jit
def _flat_next(k, i, j, c0, g, k_lo, k_hi, i_lo, j_lo, KW, CPG, BLOCK_K: tl.constexpr):
    """The step after (tap k = i*KW + j, channels from c0, offset group g) in the forward's flat loop,
    taps fastest. Past the last step it runs on into channels beyond the weight group, for the caller
    to mask. Counters rather than divisions: a division by a runtime integer costs ~20 instructions.
    The host guarantees that no channel block crosses an offset group."""
    wrap = k + 1 == k_hi
    row_end = j + 1 == KW
    c_next = tl.where(wrap, c0 + BLOCK_K, c0)
    return (
        tl.where(wrap, k_lo, k + 1),
        tl.where(wrap, i_lo, tl.where(row_end, i + 1, i)),
        tl.where(wrap, j_lo, tl.where(row_end, 0, j + 1)),
        c_next,
        tl.where(c_next >= g * CPG + CPG, g + 1, g),
    )


@triton.jit
def _flat_next_channels_inner(k, i, j, c0, g, c_lo, c_hi, g_lo, KW, CPG, BLOCK_K: tl.constexpr):
    """The step after (tap k = i*KW + j, channels from c0, offset group g) in the forward's flat loop
    with channels fastest (``CHANNELS_INNER``), and whether it needs new samples (a new tap or a new
    offset group). Past the last tap it runs on into taps beyond, for the caller to mask."""
    c_next = c0 + BLOCK_K
    wrap = c_next >= c_hi
    row_end = j + 1 == KW
    g_next = tl.where(wrap, g_lo, tl.where(c_next >= g * CPG + CPG, g + 1, g))
    return (
        tl.where(wrap, k + 1, k),
        tl.where(wrap, tl.where(row_end, i + 1, i), i),
        tl.where(wrap, tl.where(row_end, 0, j + 1), j),
        tl.where(wrap, c_lo, c_next),
        g_next,
        wrap | (g_next != g),
    )


@triton.jit
def _flat_step_after(
    k, i, j, c0, g, k_lo, k_hi, i_lo, j_lo, c_lo, c_hi, g_lo, KW, CPG,
    CHANNELS_INNER: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The flat loop's next step in either order, and whether it sets its samples up (always, taps
    inner)."""
    if CHANNELS_INNER:
        return _flat_next_channels_inner(k, i, j, c0, g, c_lo, c_hi, g_lo, KW, CPG, BLOCK_K)
    k1, i1, j1, c1, g1 = _flat_next(k, i, j, c0, g, k_lo, k_hi, i_lo, j_lo, KW, CPG, BLOCK_K)
    return k1, i1, j1, c1, g1, k1 == k1


@triton.jit(do_not_specialize=[*_SPATIAL_ARGS, "TILES", "TAPS_PER_SPLIT"])
def deform_conv_fwd_kernel(
    x_ptr, off_ptr, msk_ptr, w_ptr, b_ptr, out_ptr,
    N, H, W, C, HoWo, Wo, CG_IN, CG_OUT, CPG, NTAPS, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TILES, TAPS_PER_SPLIT,
    OFF_SN, OFF_SC, OFF_SP, MSK_SN, MSK_SC, MSK_SP, OUT_SN, OUT_SC, OUT_SP,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_TAPS: tl.constexpr, MMA: tl.constexpr,
    PRECISION: tl.constexpr, CT: tl.constexpr, INDEX64: tl.constexpr, W_K_MAJOR: tl.constexpr,
    FLAT: tl.constexpr, CHANNELS_INNER: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, LOW_BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, o] = bias[o] + sum over taps k and input channels c of w[k, c, o] * sample(m, k, c).

    ``W_K_MAJOR``: ``w`` is [groups, K, CG_OUT, CG_IN] (input channels contiguous), else
    [groups, K, CG_IN, CG_OUT].
    ``FLAT`` (``Config.flat``): one loop over (channel block, tap), taps fastest, pipelined by hand
    (launched with one stage), instead of a channel-block loop inside a tap loop; it needs every
    channel block inside one offset group. ``CHANNELS_INNER`` (flat only): the flat loop with the
    channel blocks fastest instead of the taps, setting the samples up only where a step starts a
    tap or an offset group. ``WHOLE_BLOCKS``: BLOCK_K divides the channels of every
    weight group and offset group, so no channel block is partial (``_channel_mask``). ``LOW_BLEND``
    (16-bit only): the neighbours blended in their own dtype (``_blend_dot``).

    Implicit GEMM: one program owns BLOCK_M output pixels x BLOCK_N output channels of one weight
    group. For every tap and every offset group meeting the weight group it sets up the bilinear
    samples once, then for each BLOCK_K slice of the channels gathers the four neighbours, blends
    them (bilinear weight x mask folded into one factor per neighbour) and feeds the matrix unit.
    With ``SPLIT_TAPS`` the taps are split too, TAPS_PER_SPLIT per program, for shapes with fewer
    (pixel, channel) tiles than multiprocessors: each split adds its partial sums into ``out`` (a
    zeroed fp32/fp64 buffer) with atomics, the first one adding the bias.
    Grid: (splits * TILES,) with TILES = N * cdiv(Ho*Wo, BLOCK_M) * groups * cdiv(CG_OUT, BLOCK_N),
    output-channel blocks fastest so that the programs re-gathering the same pixels run together and
    hit L2; the split slowest.
    """
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    k_lo = 0
    k_hi = NTAPS
    if SPLIT_TAPS:
        k_lo = (pid // TILES) * TAPS_PER_SPLIT
        k_hi = tl.minimum(NTAPS, k_lo + TAPS_PER_SPLIT)
        pid = pid % TILES
    n_blocks = tl.cdiv(CG_OUT, BLOCK_N)
    groups = C // CG_IN
    wg = (pid // n_blocks) % groups
    nb = pid % n_blocks
    n, p, oy, ox, row_ok = _pixel_tile(pid // (groups * n_blocks), HoWo, Wo, BLOCK_M)
    off_row = n * OFF_SN + p * OFF_SP
    msk_row = n * MSK_SN + p * MSK_SP
    ocols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = ocols < CG_OUT

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=CT)
    c_lo = wg * CG_IN
    c_hi = c_lo + CG_IN
    if not FLAT:
        g_lo = c_lo // CPG
        g_hi = (c_hi - 1) // CPG + 1
        for k in range(k_lo, k_hi):
            for g in range(g_lo, g_hi):
                y0, x0, ly, lx, inside, outside, mod = _sample(
                    off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok, g * NTAPS + k,
                    k // KW, k % KW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CT,
                )  # fmt: skip
                w00, w01, w10, w11, r00, ok00, ok01, ok10, ok11 = _blend_factors(
                    n, row_ok, H, W, y0, x0, ly, lx, inside, outside, mod
                )
                seg_hi = tl.minimum(c_hi, g * CPG + CPG)
                for c0 in range(tl.maximum(c_lo, g * CPG), seg_hi, BLOCK_K):
                    cols = c0 + tl.arange(0, BLOCK_K)
                    cmask = _channel_mask(cols, seg_hi, WHOLE_BLOCKS, BLOCK_K)
                    v00, v01, v10, v11 = _gather(
                        x_ptr, r00, ok00, ok01, ok10, ok11, cols, cmask, C, W, x_ptr.dtype.element_ty
                    )
                    wt = _fwd_weight_tile(
                        w_ptr, wg * NTAPS + k, cols, cmask, c_lo, CG_IN, CG_OUT, ocols, omask, W_K_MAJOR
                    )
                    acc = _blend_dot(
                        acc, w00, w01, w10, w11, v00, v01, v10, v11, wt, cmask, MMA, PRECISION, CT, LOW_BLEND
                    )
    else:
        # One loop over (channel block, tap), pipelined by hand in registers: each step issues the
        # next step's gathers and weight tile, and the offsets of the one after, before it blends its
        # own. No drain at the end of every tap's few channel blocks, and plain loads that L1 caches
        # (Triton's pipeline copies with cp.async, 16 bytes at a time, through L2 only). Taps fastest
        # (default): a channel block's neighbourhoods, which overlap from tap to tap, are read in
        # succession, and each step sets its samples up again. CHANNELS_INNER: channel blocks fastest,
        # a step reusing the samples of the one before unless it starts a tap or an offset group.
        # Suffix 1: the next step; 2: the one after.
        steps = tl.cdiv(CG_IN, BLOCK_K) * (k_hi - k_lo)
        i_lo = k_lo // KW
        j_lo = k_lo % KW
        g_lo = c_lo // CPG
        dy, dx, dm = _tap_offsets(
            off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, row_ok, g_lo * NTAPS + k_lo, HAS_MASK, CT
        )
        s00, s01, s10, s11, r00, ok00, ok01, ok10, ok11 = _fwd_step_setup(
            dy, dx, dm, n, oy, ox, row_ok, True, i_lo, j_lo, H, W, stride_h, stride_w, pad_h, pad_w,
            dil_h, dil_w, CT,
        )  # fmt: skip
        v00, v01, v10, v11, wt, cmask = _fwd_step_loads(
            x_ptr, w_ptr, r00, ok00, ok01, ok10, ok11, True, wg * NTAPS + k_lo, c_lo,
            tl.minimum(c_hi, g_lo * CPG + CPG), c_lo, W, C, CG_IN, CG_OUT, ocols, omask,
            W_K_MAJOR, WHOLE_BLOCKS, BLOCK_K,
        )  # fmt: skip
        w00, w01, w10, w11 = s00, s01, s10, s11
        k1, i1, j1, c1, g1, fresh1 = _flat_step_after(
            k_lo, i_lo, j_lo, c_lo, g_lo, k_lo, k_hi, i_lo, j_lo, c_lo, c_hi, g_lo, KW, CPG,
            CHANNELS_INNER, BLOCK_K,
        )  # fmt: skip
        dy, dx, dm = _tap_offsets(
            off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, tl.where(steps > 1, row_ok, False),
            g1 * NTAPS + k1, HAS_MASK, CT,
        )  # fmt: skip
        for step in range(0, steps):
            live = step + 1 < steps
            # A new tap or offset group (taps inner: every step), or past the end (nothing loaded).
            if fresh1 | (step + 1 >= steps):
                s00, s01, s10, s11, r00, ok00, ok01, ok10, ok11 = _fwd_step_setup(
                    dy, dx, dm, n, oy, ox, row_ok, live, i1, j1, H, W, stride_h, stride_w, pad_h, pad_w,
                    dil_h, dil_w, CT,
                )  # fmt: skip
            n00, n01, n10, n11, nwt, cmask1 = _fwd_step_loads(
                x_ptr, w_ptr, r00, ok00, ok01, ok10, ok11, live, wg * NTAPS + k1, c1,
                tl.minimum(c_hi, g1 * CPG + CPG), c_lo, W, C, CG_IN, CG_OUT, ocols, omask,
                W_K_MAJOR, WHOLE_BLOCKS, BLOCK_K,
            )  # fmt: skip
            k2, i2, j2, c2, g2, fresh2 = _flat_step_after(
                k1, i1, j1, c1, g1, k_lo, k_hi, i_lo, j_lo, c_lo, c_hi, g_lo, KW, CPG, CHANNELS_INNER, BLOCK_K
            )
            dy, dx, dm = _tap_offsets(
                off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC,
                tl.where(step + 2 < steps, row_ok, False), g2 * NTAPS + k2, HAS_MASK, CT,
            )  # fmt: skip
            acc = _blend_dot(
                acc, w00, w01, w10, w11, v00, v01, v10, v11, wt, cmask, MMA, PRECISION, CT, LOW_BLEND
            )
            w00, w01, w10, w11 = s00, s01, s10, s11
            v00, v01, v10, v11 = n00, n01, n10, n11
            wt = nwt
            cmask = cmask1
            k1, i1, j1, c1, g1, fresh1 = k2, i2, j2, c2, g2, fresh2

    oc = wg * CG_OUT + ocols
    if HAS_BIAS:
        bias = tl.load(b_ptr + oc, mask=omask, other=0.0).to(CT)
        if SPLIT_TAPS:
            bias = tl.where(k_lo == 0, bias, 0.0)
        acc += bias[None, :]
    optr = out_ptr + n * OUT_SN + oc[None, :] * OUT_SC + p[:, None] * OUT_SP
    if SPLIT_TAPS:
        tl.atomic_add(optr, acc, mask=row_ok[:, None] & omask[None, :], sem="relaxed")
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & omask[None, :])


@triton.jit(do_not_specialize=_SPATIAL_ARGS)
def deform_conv_bwd_data_kernel(
    x_ptr, off_ptr, msk_ptr, w_ptr, go_ptr,
    gx_ptr, goff_ptr, gmsk_ptr, colgrad_ptr, frac_ptr, key_ptr,
    N, H, W, C, HoWo, Wo, CG_IN, CG_OUT, CPG, G, NTAPS, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, SENTINEL, GO_SN, GO_SC, GO_SP,
    OFF_SN, OFF_SC, OFF_SP, MSK_SN, MSK_SC, MSK_SP, GOFF_SN, GOFF_SC, GOFF_SP, GMSK_SN, GMSK_SC, GMSK_SP,
    HAS_MASK: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
    DETERMINISTIC: tl.constexpr, ONE_O_BLOCK: tl.constexpr, MMA: tl.constexpr, PRECISION: tl.constexpr,
    CT: tl.constexpr, INDEX64: tl.constexpr, GO_ALIGN: tl.constexpr, DEFER_SUMS: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr, GATHERED_LAYOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """Gradients through the sampled columns for one (pixel block, offset group g, tap k).

    For each BLOCK_C slice of g's channels (split where a weight group ends):
        gcol[m, c] = sum_o go[m, o] * w[c, k, o]                       (matrix unit, CT accumulation)
        grad_mask[m, g, k]   += sum_c gcol * bilinear(m, c)
        grad_offset[m, g, k] += mod * sum_c gcol * d bilinear(m, c) / d(y, x)
        grad_input[corner]   += gcol * mod * (corner's bilinear weight)
    The program owns every channel of (m, g, k), so grad_offset and grad_mask are plain stores.
    ``ONE_O_BLOCK`` (BLOCK_O >= CG_OUT) keeps the grad_out tile in registers across the channel blocks.
    ``WHOLE_BLOCKS``: BLOCK_C divides the channels of every weight group and offset group (no partial
    channel block: ``_channel_mask``).
    ``DEFER_SUMS`` accumulates the three products with gcol in [BLOCK_M, BLOCK_C] tiles across the
    channel blocks and sums them over channels once, after the loops, for 3 * BLOCK_M * BLOCK_C more
    accumulator registers per program (without GATHERED_LAYOUT the products stay in the matrix unit's
    layout and three of the ten layout conversions per block leave the loop; with it the sums' shuffles
    do).
    ``GATHERED_LAYOUT``: gcol leaves the matrix unit's layout once per block
    (``_off_the_matrix_layout``) and the scatter adds rows of two neighbours
    (``_scatter_corner_pairs``): 2-3 layout conversions through shared memory per channel block
    instead of 10 (the host's choice: ``deform_conv.DATA_GATHERED_LAYOUT``).
    grad_input is either scattered with atomics into the float accumulator ``gx`` [N, H, W, C]
    (channels-last), or, with DETERMINISTIC, not scattered at all: the program stores
    gcol * mod to ``colgrad`` [M*G*K, CPG], the fractional parts (ly, lx) to ``frac`` [M*G*K, 2]
    and the sample's neighbourhood cell to ``key`` [M*G*K] (SENTINEL for samples outside), which
    the host sorts for ``deform_conv_cell_sums_kernel``. Sample s = (m*G + g)*K + k.
    Grid: (N * cdiv(Ho*Wo, BLOCK_M) * G * K,), (g, k) fastest.
    """
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    GK = G * NTAPS
    gk = pid % GK
    g = gk // NTAPS
    k = gk % NTAPS
    i = k // KW
    j = k % KW
    n, p, oy, ox, row_ok = _pixel_tile(pid // GK, HoWo, Wo, BLOCK_M)
    off_row = n * OFF_SN + p * OFF_SP
    msk_row = n * MSK_SN + p * MSK_SP
    y0, x0, ly, lx, inside, outside, mod = _sample(
        off_ptr, msk_ptr, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok, gk, i, j, H, W,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CT,
    )  # fmt: skip
    r00, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, row_ok, H, W)
    b00, b01, b10, b11 = _bilinear_weights(ly, lx)
    # GATHERED_LAYOUT's scatter in rows of two neighbours: where the neighbours' loads and the fp32
    # atomics take different layouts (16-bit neighbours load 8 to a thread, the atomics 4; Triton 3.6's
    # fp32 gather takes 2), the scatter's values change layout once, not once per neighbour.
    upper, lower, ok_upper, ok_lower, b_upper, b_lower = _corner_pairs(
        r00, ok00, ok01, ok10, ok11, b00, b01, b10, b11, W
    )  # (dead code without GATHERED_LAYOUT)
    scale = tl.where(inside, 1.0, outside) * mod
    sample = ((n * HoWo + p) * G + g) * NTAPS + k

    grad_y = tl.zeros([BLOCK_M], dtype=CT)
    grad_x = tl.zeros([BLOCK_M], dtype=CT)
    grad_m = tl.zeros([BLOCK_M], dtype=CT)
    acc_y = tl.zeros([BLOCK_M, BLOCK_C], dtype=CT)  # DEFER_SUMS only (dead code otherwise)
    acc_x = tl.zeros([BLOCK_M, BLOCK_C], dtype=CT)
    acc_m = tl.zeros([BLOCK_M, BLOCK_C], dtype=CT)
    cg_lo = g * CPG
    cg_hi = cg_lo + CPG
    wg_lo = cg_lo // CG_IN
    wg_hi = (cg_hi - 1) // CG_IN + 1
    for wg in range(wg_lo, wg_hi):
        seg_lo = tl.maximum(cg_lo, wg * CG_IN)
        seg_hi = tl.minimum(cg_hi, wg * CG_IN + CG_IN)
        if ONE_O_BLOCK:  # the grad_out tile of this weight group, loaded once for all channel blocks
            ocols = tl.arange(0, BLOCK_O)
            go_tile = _load_grad_out(
                go_ptr, n, p, HoWo, wg * CG_OUT + ocols, ocols < CG_OUT, GO_SN, GO_SC, GO_SP, GO_ALIGN
            )
        for c0 in range(seg_lo, seg_hi, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = _channel_mask(cols, seg_hi, WHOLE_BLOCKS, BLOCK_C)
            wrow = cols * NTAPS + k  # w [groups, CG_IN, K, CG_OUT]: row (input channel, tap)
            gcol = tl.zeros([BLOCK_M, BLOCK_C], dtype=CT)
            if ONE_O_BLOCK:
                wt = tl.load(
                    w_ptr + wrow[None, :] * CG_OUT + ocols[:, None],
                    mask=(ocols < CG_OUT)[:, None] & cmask[None, :],
                    other=0.0,
                )
                gcol = _mma(go_tile, wt, gcol, MMA, PRECISION)
            else:
                for o0 in range(0, CG_OUT, BLOCK_O):
                    ocols = o0 + tl.arange(0, BLOCK_O)
                    omask = ocols < CG_OUT
                    go = _load_grad_out(
                        go_ptr, n, p, HoWo, wg * CG_OUT + ocols, omask, GO_SN, GO_SC, GO_SP, GO_ALIGN
                    )
                    wt = tl.load(
                        w_ptr + wrow[None, :] * CG_OUT + ocols[:, None],
                        mask=omask[:, None] & cmask[None, :],
                        other=0.0,
                    )
                    gcol = _mma(go, wt, gcol, MMA, PRECISION)
            gcol = tl.where(cmask[None, :], gcol, 0.0)
            if GATHERED_LAYOUT:
                gcol = _off_the_matrix_layout(gcol, BLOCK_M, BLOCK_C)

            if NEED_OFFSET or NEED_MASK:
                v00, v01, v10, v11 = _gather(x_ptr, r00, ok00, ok01, ok10, ok11, cols, cmask, C, W, CT)
                # The value and its two derivatives through shared differences: the top and bottom
                # rows interpolated along x, then along y (8 operations per element, not 12).
                dtop = v01 - v00
                dbot = v11 - v10
                top = v00 + lx[:, None] * dtop
                dvy = v10 + lx[:, None] * dbot - top  # bottom row minus top row
                if NEED_MASK:
                    val = top + ly[:, None] * dvy
                    if DEFER_SUMS:
                        acc_m += gcol * val
                    else:
                        grad_m += tl.sum(gcol * val, axis=1)
                if NEED_OFFSET:
                    dvx = dtop + ly[:, None] * (dbot - dtop)
                    if DEFER_SUMS:
                        acc_y += gcol * dvy
                        acc_x += gcol * dvx
                    else:
                        grad_y += tl.sum(gcol * dvy, axis=1)
                        grad_x += tl.sum(gcol * dvx, axis=1)

            if NEED_INPUT:
                gm = gcol * scale[:, None]
                if DETERMINISTIC:
                    tl.store(
                        colgrad_ptr + sample[:, None] * CPG + (cols - cg_lo)[None, :],
                        gm,
                        mask=row_ok[:, None] & cmask[None, :],
                    )
                elif GATHERED_LAYOUT:
                    _scatter_corner_pairs(
                        gx_ptr, upper, lower, ok_upper, ok_lower, b_upper, b_lower, gm, cols, cmask, C
                    )
                else:
                    _scatter_corners(
                        gx_ptr, r00, ok00, ok01, ok10, ok11, b00, b01, b10, b11, gm, cols, cmask[None, :],
                        C, W,
                    )  # fmt: skip

    if DEFER_SUMS:
        grad_y = tl.sum(acc_y, axis=1)
        grad_x = tl.sum(acc_x, axis=1)
        grad_m = tl.sum(acc_m, axis=1)
    if NEED_OFFSET:
        obase = n * GOFF_SN + p * GOFF_SP + (2 * gk) * GOFF_SC
        gy = tl.where(inside, grad_y * mod, outside)
        gx = tl.where(inside, grad_x * mod, outside)
        tl.store(goff_ptr + obase, gy.to(goff_ptr.dtype.element_ty), mask=row_ok)
        tl.store(goff_ptr + obase + GOFF_SC, gx.to(goff_ptr.dtype.element_ty), mask=row_ok)
    if NEED_MASK:
        gmv = tl.where(inside, grad_m, outside)
        tl.store(
            gmsk_ptr + n * GMSK_SN + p * GMSK_SP + gk * GMSK_SC,
            gmv.to(gmsk_ptr.dtype.element_ty),
            mask=row_ok,
        )
    if NEED_INPUT and DETERMINISTIC:
        tl.store(frac_ptr + sample * 2, ly, mask=row_ok)
        tl.store(frac_ptr + sample * 2 + 1, lx, mask=row_ok)
        cell = ((n.to(tl.int64) * G + g) * (H + 1) + (y0 + 1)) * (W + 1) + (x0 + 1)
        tl.store(key_ptr + sample, tl.where(inside, cell, SENTINEL), mask=row_ok)


@triton.jit(do_not_specialize=["CELLS"])
def deform_conv_cell_sums_kernel(
    colgrad_ptr, frac_ptr, order_ptr, start_ptr, sums_ptr,
    CELLS, CPG,
    CT: tl.constexpr, INDEX64: tl.constexpr, BLOCK_CELLS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Deterministic grad_input, step 1: per neighbourhood cell, the four corner-weighted sums of the
    column gradients of the samples in it.

    The samples were sorted stably by cell (cell (n, g, y0 + 1, x0 + 1) of the [N, G, H + 1, W + 1]
    grid holds the samples whose top-left neighbour is (y0, x0)): ``order`` [S] lists them in that
    order and ``start`` [CELLS + 1] delimits each cell's run. For cell q and corner t (00, 01, 10, 11;
    weights (1-ly)(1-lx), (1-ly)lx, ly(1-lx), ly*lx):
        sums[t, q, c] = sum over the run of q, in sorted order, of weight_t(s) * colgrad[s, c]
    (0 for a cell without samples). Each sample's row is read once; the additions run in a fixed
    order without atomics, so the result is bitwise repeatable.
    Grid: (cdiv(CELLS, BLOCK_CELLS) * cdiv(CPG, BLOCK_C),), channel block fastest.
    """
    pid = tl.program_id(0)
    if INDEX64:  # the corner planes' offsets (t * CELLS * CPG) too
        pid = pid.to(tl.int64)
        CELLS = CELLS.to(tl.int64)
    c_blocks = tl.cdiv(CPG, BLOCK_C)
    cb = pid % c_blocks
    cell = (pid // c_blocks) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    cell_ok = cell < CELLS
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < CPG
    lo = tl.load(start_ptr + cell, mask=cell_ok, other=0)
    hi = tl.load(start_ptr + cell + 1, mask=cell_ok, other=0)

    acc00 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=CT)
    acc01 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=CT)
    acc10 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=CT)
    acc11 = tl.zeros([BLOCK_CELLS, BLOCK_C], dtype=CT)
    for e in range(0, tl.max(hi - lo, axis=0)):
        idx = lo + e
        act = idx < hi
        s = tl.load(order_ptr + idx, mask=act, other=0)
        ly = tl.load(frac_ptr + s * 2, mask=act, other=0.0)
        lx = tl.load(frac_ptr + s * 2 + 1, mask=act, other=0.0)
        # Rows past their run read sample 0 and discard it: the load's mask is over channels only,
        # as a 2-D mask here trips Triton 3.6's layout pass.
        v = tl.load(colgrad_ptr + s[:, None] * CPG + cols[None, :], mask=cmask[None, :], other=0.0)
        v = tl.where(act[:, None], v, 0.0)
        acc00 += ((1.0 - ly) * (1.0 - lx))[:, None] * v
        acc01 += ((1.0 - ly) * lx)[:, None] * v
        acc10 += (ly * (1.0 - lx))[:, None] * v
        acc11 += (ly * lx)[:, None] * v

    ptr = sums_ptr + cell[:, None] * CPG + cols[None, :]
    smask = cell_ok[:, None] & cmask[None, :]
    tl.store(ptr, acc00, mask=smask)
    tl.store(ptr + CELLS * CPG, acc01, mask=smask)
    tl.store(ptr + 2 * CELLS * CPG, acc10, mask=smask)
    tl.store(ptr + 3 * CELLS * CPG, acc11, mask=smask)


@triton.jit(do_not_specialize=["N", "H", "W", "CELLS"])
def deform_conv_gather_input_grad_kernel(
    sums_ptr, gx_ptr,
    N, H, W, HW, C, G, CPG, CELLS,
    CT: tl.constexpr, INDEX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Deterministic grad_input, step 2: each input pixel adds the cell sums it is a corner of.

    Input pixel (y, x) is the top-left neighbour of the samples in cell (y + 1, x + 1), the top-right
    one of cell (y + 1, x), the bottom-left one of cell (y, x + 1) and the bottom-right one of cell
    (y, x): it adds sums[0] of the first, sums[1] of the second, sums[2] and sums[3] of the others
    (``deform_conv_cell_sums_kernel``), in that order. ``gx`` is written directly as [N, C, H, W] in
    its own dtype.
    Grid: (N * cdiv(H*W, BLOCK_P) * G * cdiv(CPG, BLOCK_C),).
    """
    pid = tl.program_id(0)
    if INDEX64:  # the corner planes' offsets (t * CELLS) too
        pid = pid.to(tl.int64)
        CELLS = CELLS.to(tl.int64)
    c_blocks = tl.cdiv(CPG, BLOCK_C)
    g = (pid // c_blocks) % G
    cb = pid % c_blocks
    n, q, y, x, pix_ok = _pixel_tile(pid // (G * c_blocks), HW, W, BLOCK_P)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < CPG

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=CT)
    cell_row = (n * G + g) * (H + 1)
    for t in tl.static_range(4):
        cell = (cell_row + y + 1 - t // 2) * (W + 1) + x + 1 - t % 2
        rows = t * CELLS + cell
        acc += tl.load(
            sums_ptr + rows[:, None] * CPG + cols[None, :], mask=pix_ok[:, None] & cmask[None, :], other=0.0
        )

    optr = gx_ptr + (n * C + g * CPG + cols)[None, :] * HW + q[:, None]
    tl.store(optr, acc.to(gx_ptr.dtype.element_ty), mask=pix_ok[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=[*_SPATIAL_ARGS, "TILES_PER_SPLIT"])
def deform_conv_bwd_weight_kernel(
    x_ptr, off_ptr, msk_ptr, go_ptr, part_ptr,
    N, H, W, C, HoWo, Wo, CG_IN, CG_OUT, CPG, NTAPS, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TILES_PER_SPLIT, GO_SN, GO_SC, GO_SP,
    OFF_SN, OFF_SC, OFF_SP, MSK_SN, MSK_SC, MSK_SP,
    HAS_MASK: tl.constexpr, ONE_GROUP: tl.constexpr, ATOMIC: tl.constexpr, MMA: tl.constexpr,
    PRECISION: tl.constexpr,
    CT: tl.constexpr, INDEX64: tl.constexpr, GO_ALIGN: tl.constexpr, GO_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Split-K weight gradient: part[s, wg, c, k, o] = sum over split s's pixels m of col[m, k, c] * go[m, o].

    The columns are recomputed (gathered and blended as in the forward), never stored. One program
    owns BLOCK_K input channels x BLOCK_N output channels of one (weight group, tap) and the pixel
    tiles [s*TILES_PER_SPLIT, (s+1)*TILES_PER_SPLIT) of all N * cdiv(Ho*Wo, BLOCK_M). With ``ATOMIC``
    the splits add into part[0] (zeroed) with fp32 atomics; otherwise each writes its own slice and the
    host sums ``part`` over s in a fixed order (deterministic mode). A channel block that crosses
    offset groups blends each group's channels with that group's samples; ``ONE_GROUP`` (no block
    crosses one) drops that inner loop, leaving the pixel loop innermost for software pipelining.
    ``GO_FIRST`` accumulates the transposed tile, go^T @ col (``Config.go_first``): the same sums.
    Grid: (splits * groups * K * cdiv(CG_IN, BLOCK_K) * cdiv(CG_OUT, BLOCK_N),), output blocks fastest.
    """
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    groups = C // CG_IN
    n_ob = tl.cdiv(CG_OUT, BLOCK_N)
    n_cb = tl.cdiv(CG_IN, BLOCK_K)
    ob = pid % n_ob
    rest = pid // n_ob
    cb = rest % n_cb
    rest = rest // n_cb
    k = rest % NTAPS
    rest = rest // NTAPS
    wg = rest % groups
    split = rest // groups
    i = k // KW
    j = k % KW

    c_start = wg * CG_IN + cb * BLOCK_K
    c_end = wg * CG_IN + CG_IN
    cols = c_start + tl.arange(0, BLOCK_K)
    # ONE_GROUP: BLOCK_K divides the weight group's channels too, so every block is whole.
    cmask = _channel_mask(cols, c_end, ONE_GROUP, BLOCK_K)
    g_first = c_start // CPG
    g_last = (tl.minimum(c_start + BLOCK_K, c_end) - 1) // CPG
    ocols = ob * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = ocols < CG_OUT
    oc = wg * CG_OUT + ocols

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=CT) if GO_FIRST else tl.zeros([BLOCK_K, BLOCK_N], dtype=CT)
    t_start = split * TILES_PER_SPLIT
    t_end = tl.minimum(N * tl.cdiv(HoWo, BLOCK_M), t_start + TILES_PER_SPLIT)
    for t in range(t_start, t_end):
        n, p, oy, ox, row_ok = _pixel_tile(t, HoWo, Wo, BLOCK_M)
        off_row = n * OFF_SN + p * OFF_SP
        msk_row = n * MSK_SN + p * MSK_SP
        if ONE_GROUP:
            a = _columns(
                x_ptr, off_ptr, msk_ptr, n, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok,
                g_first * NTAPS + k, i, j, H, W, C,
                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, cols, cmask, HAS_MASK, CT,
            )  # fmt: skip
        else:
            a = tl.zeros([BLOCK_M, BLOCK_K], dtype=CT)
            for g in range(g_first, g_last + 1):
                gmask = cmask & (cols >= g * CPG) & (cols < g * CPG + CPG)
                blend = _columns(
                    x_ptr, off_ptr, msk_ptr, n, off_row, msk_row, OFF_SC, MSK_SC, oy, ox, row_ok,
                    g * NTAPS + k, i, j, H, W, C,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, cols, gmask, HAS_MASK, CT,
                )  # fmt: skip
                a = tl.where(gmask[None, :], blend, a)
        go = _load_grad_out(go_ptr, n, p, HoWo, oc, omask, GO_SN, GO_SC, GO_SP, GO_ALIGN)
        if GO_FIRST:
            acc = _mma(tl.trans(go), a.to(go_ptr.dtype.element_ty), acc, MMA, PRECISION)
        else:
            acc = _mma(tl.trans(a.to(go_ptr.dtype.element_ty)), go, acc, MMA, PRECISION)

    # part [splits, groups, CG_IN, K, CG_OUT]: row (split, input channel, tap); one split if ATOMIC
    prow = (cols if ATOMIC else split * C + cols) * NTAPS + k
    if GO_FIRST:  # acc[o, c]
        where = part_ptr + prow[None, :] * CG_OUT + ocols[:, None]
        valid = cmask[None, :] & omask[:, None]
    else:  # acc[c, o]
        where = part_ptr + prow[:, None] * CG_OUT + ocols[None, :]
        valid = cmask[:, None] & omask[None, :]
    if ATOMIC:
        tl.atomic_add(where, acc, mask=valid, sem="relaxed")
    else:
        tl.store(where, acc, mask=valid)


@triton.jit(do_not_specialize=[*_SPATIAL_ARGS, "TILES_PER_SPLIT"])
def deform_conv_bwd_fused_kernel(
    x_ptr, off_ptr, msk_ptr, w_ptr, go_ptr,
    gx_ptr, goff_ptr, gmsk_ptr, part_ptr,
    N, H, W, C, HoWo, Wo, CG_IN, CG_OUT, CPG, NTAPS, KW, SEG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TILES_PER_SPLIT, GO_SN, GO_SC, GO_SP,
    OFF_SN, OFF_SC, OFF_SP, MSK_SN, MSK_SC, MSK_SP, GOFF_SN, GOFF_SC, GOFF_SP, GMSK_SN, GMSK_SC, GMSK_SP,
    HAS_MASK: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
    SUMS_ATOMIC: tl.constexpr, MMA: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr,
    INDEX64: tl.constexpr, GO_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """The data and weight kernels in one pass: every gradient but the bias's, each sample gathered once.

    Channels fall into segments of SEG = min(CG_IN, CPG) channels, each inside one weight group wg
    and one offset group g. One program owns BLOCK_C channels of a segment at one tap k, and the
    pixel tiles [s*TILES_PER_SPLIT, (s+1)*TILES_PER_SPLIT); per tile of BLOCK_M pixels:
        gcol = go[m, :] @ w[c, k, :]^T                      (matrix unit; the weight tile loaded once)
        grad_offset, grad_mask of (m, g, k): the sums over this block's channels, as in the data kernel
        grad_input[corner] += gcol * mod * (corner's bilinear weight)     (fp32 atomics)
        acc_w[o, c] += go[m, o]^T @ col[m, c]               (col: the sampled column, mask applied)
    and at the end adds acc_w into part [groups, CG_IN, K, CG_OUT] (fp32, zeroed) with atomics.
    ``SUMS_ATOMIC``: several programs share an offset group's (m, k) (the group has more channels
    than one block), so their partial sums are added with atomics into zeroed accumulators of the
    compute dtype; otherwise stored. BLOCK_O >= CG_OUT: the grad_out tile holds a weight group's
    output channels, the operand of both products.
    Grid: (splits * (C // SEG) * K * cdiv(SEG, BLOCK_C),), channel block fastest.
    """
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    n_cb = tl.cdiv(SEG, BLOCK_C)
    cb = pid % n_cb
    rest = pid // n_cb
    k = rest % NTAPS
    rest = rest // NTAPS
    segments = C // SEG
    seg_lo = (rest % segments) * SEG
    split = rest // segments
    i = k // KW
    j = k % KW
    cols = seg_lo + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < seg_lo + SEG
    wg = seg_lo // CG_IN
    gk = (seg_lo // CPG) * NTAPS + k
    ocols = tl.arange(0, BLOCK_O)
    omask = ocols < CG_OUT
    oc = wg * CG_OUT + ocols
    wrow = cols * NTAPS + k  # w and part [groups, CG_IN, K, CG_OUT]: row (input channel, tap)
    wt = tl.load(
        w_ptr + wrow[None, :] * CG_OUT + ocols[:, None], mask=omask[:, None] & cmask[None, :], other=0.0
    )
    cm = cmask[None, :]
    acc_w = tl.zeros([BLOCK_O, BLOCK_C], dtype=CT)
    t_start = split * TILES_PER_SPLIT
    t_end = tl.minimum(N * tl.cdiv(HoWo, BLOCK_M), t_start + TILES_PER_SPLIT)
    for t in range(t_start, t_end):
        n, p, oy, ox, row_ok = _pixel_tile(t, HoWo, Wo, BLOCK_M)
        y0, x0, ly, lx, inside, outside, mod = _sample(
            off_ptr, msk_ptr, n * OFF_SN + p * OFF_SP, n * MSK_SN + p * MSK_SP, OFF_SC, MSK_SC, oy, ox,
            row_ok, gk, i, j, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CT,
        )  # fmt: skip
        r00, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, row_ok, H, W)
        b00, b01, b10, b11 = _bilinear_weights(ly, lx)
        scale = tl.where(inside, 1.0, outside) * mod
        go = _load_grad_out(go_ptr, n, p, HoWo, oc, omask, GO_SN, GO_SC, GO_SP, GO_ALIGN)
        gcol = _mma(go, wt, tl.zeros([BLOCK_M, BLOCK_C], dtype=CT), MMA, PRECISION)
        gcol = tl.where(cm, gcol, 0.0)
        v00, v01, v10, v11 = _gather(x_ptr, r00, ok00, ok01, ok10, ok11, cols, cmask, C, W, CT)
        # The value and its two derivatives through shared differences, as in the data kernel.
        dtop = v01 - v00
        dbot = v11 - v10
        top = v00 + lx[:, None] * dtop
        dvy = v10 + lx[:, None] * dbot - top  # bottom row minus top row
        val = top + ly[:, None] * dvy
        if NEED_OFFSET:
            dvx = dtop + ly[:, None] * (dbot - dtop)
            gy = tl.where(inside, tl.sum(gcol * dvy, axis=1) * mod, outside)
            gx = tl.where(inside, tl.sum(gcol * dvx, axis=1) * mod, outside)
            where = goff_ptr + n * GOFF_SN + p * GOFF_SP + (2 * gk) * GOFF_SC
            if SUMS_ATOMIC:
                tl.atomic_add(where, gy, mask=row_ok, sem="relaxed")
                tl.atomic_add(where + GOFF_SC, gx, mask=row_ok, sem="relaxed")
            else:
                tl.store(where, gy.to(goff_ptr.dtype.element_ty), mask=row_ok)
                tl.store(where + GOFF_SC, gx.to(goff_ptr.dtype.element_ty), mask=row_ok)
        if NEED_MASK:
            gmv = tl.where(inside, tl.sum(gcol * val, axis=1), outside)
            where = gmsk_ptr + n * GMSK_SN + p * GMSK_SP + gk * GMSK_SC
            if SUMS_ATOMIC:
                tl.atomic_add(where, gmv, mask=row_ok, sem="relaxed")
            else:
                tl.store(where, gmv.to(gmsk_ptr.dtype.element_ty), mask=row_ok)
        if NEED_INPUT:
            gm = gcol * scale[:, None]
            _scatter_corners(gx_ptr, r00, ok00, ok01, ok10, ok11, b00, b01, b10, b11, gm, cols, cm, C, W)
        # Padding channels exact zeros (a NaN sample would reach them through the scale).
        col = tl.where(cm, val * scale[:, None], 0.0)
        acc_w = _mma(tl.trans(go), col.to(go_ptr.dtype.element_ty), acc_w, MMA, PRECISION)

    where = part_ptr + wrow[None, :] * CG_OUT + ocols[:, None]
    tl.atomic_add(where, acc_w, mask=cm & omask[:, None], sem="relaxed")
