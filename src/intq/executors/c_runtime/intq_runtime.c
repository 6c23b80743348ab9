/* intq C99 runtime; see intq_runtime.h. */
#include "intq_runtime.h"

static int32_t clamp32(int64_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : (int32_t)v); }

/* round(acc * M0 * 2^-(31+n)) half away from zero, then + zero and clamp (eq. 9-10).
 * |acc| < 2^31 (proven per layer) and M0 < 2^31, so |acc * M0| < 2^62 fits int64_t; the shift is
 * applied to the magnitude, so no right shift of a negative number (implementation-defined in C99). */
int64_t intq_multiply(int64_t value, int32_t mantissa, int32_t shift) {
    int64_t product = value * (int64_t)mantissa;
    int total = 31 + shift;
    int64_t magnitude, rounded;
    if (total < 1) total = 1;
    if (total > 62) total = 62;
    magnitude = product < 0 ? -product : product;
    rounded = (magnitude + ((int64_t)1 << (total - 1))) >> total;
    return product < 0 ? -rounded : rounded;
}

int32_t intq_requantize(int64_t acc, int32_t mantissa, int32_t shift, int32_t zero, int32_t lower, int32_t upper) {
    return clamp32((int64_t)zero + intq_multiply(acc, mantissa, shift), lower, upper);
}

/* eq. 17: each operand to the common 2^-20-finer grid, an exact sum, one output requantization.
 * Budget: |q - z| <= 2^9 times M <= 2^20 gives |sum| < 2^30, times M0 < 2^31 stays below 2^61. */
static void add(const intq_op *op, const int32_t *a, const int32_t *b, int32_t *y) {
    int i;
    for (i = 0; i < op->out_c * op->out_h * op->out_w; i++) {
        int64_t sum = intq_multiply(a[i] - op->input_zero, op->mantissa[0], op->shift[0])
                    + intq_multiply(b[i] - op->input2_zero, op->mantissa[1], op->shift[1]);
        y[i] = intq_requantize(sum, op->mantissa[2], op->shift[2], op->output_zero, op->lower, op->upper);
    }
}

/* eq. 30: each input requantized to the output's grid, q_y = clamp(z_y + round(M_i (q_i - z_i))),
 * its channels after those of the inputs before it. Budget: |q - z| < 2^16 times M0 < 2^31 < 2^47. */
static void concat(const intq_op *op, const int32_t *input, int32_t *const *buffers, int32_t *y) {
    long k, i, plane = (long)op->out_h * op->out_w, offset = 0;
    for (k = 0; k < op->source_count; k++) {
        const int32_t *x = op->sources[k] < 0 ? input : buffers[op->sources[k]];
        for (i = 0; i < op->source_channels[k] * plane; i++)
            y[offset + i] = intq_requantize(x[i] - op->source_zeros[k], op->mantissa[k], op->shift[k],
                                            op->output_zero, op->lower, op->upper);
        offset += op->source_channels[k] * plane;
    }
}

/* eq. 34: q_y = clamp(z_y + round(M (q_a - z_a)(q_b - z_b))), M = s_a s_b / s_y; an operand of one value
 * per channel (a 1 x 1 plane, the squeeze-excite gate) is read at its channel for the whole plane.
 * Budget: |(q_a - z_a)(q_b - z_b)| <= 2^31 - 1 (model_check, from both types) times M0 < 2^31 < 2^62. */
static void mul(const intq_op *op, const int32_t *a, const int32_t *b, int32_t *y) {
    long c, p, plane = (long)op->out_h * op->out_w;
    long a_plane = (long)op->in_h * op->in_w, b_plane = (long)op->in2_h * op->in2_w;
    for (c = 0; c < op->out_c; c++)
        for (p = 0; p < plane; p++) {
            int64_t product = (int64_t)(a[c * a_plane + (a_plane == 1 ? 0 : p)] - op->input_zero)
                            * (b[c * b_plane + (b_plane == 1 ? 0 : p)] - op->input2_zero);
            y[c * plane + p] = intq_requantize(product, op->mantissa[0], op->shift[0], op->output_zero, op->lower, op->upper);
        }
}

/* eq. 18: the window sum of (q - z_x), requantized with M = s_x / (N s_y). */
static void avgpool(const intq_op *op, const int32_t *x, int32_t *y) {
    int c, oy, ox, ky, kx;
    for (c = 0; c < op->out_c; c++)
        for (oy = 0; oy < op->out_h; oy++)
            for (ox = 0; ox < op->out_w; ox++) {
                int64_t sum = 0;
                for (ky = 0; ky < op->k_h; ky++)
                    for (kx = 0; kx < op->k_w; kx++)
                        sum += x[(c * op->in_h + oy * op->stride_h + ky) * op->in_w + ox * op->stride_w + kx] - op->input_zero;
                y[(c * op->out_h + oy) * op->out_w + ox] =
                    intq_requantize(sum, op->mantissa[0], op->shift[0], op->output_zero, op->lower, op->upper);
            }
}

static void conv2d(const intq_op *op, const int32_t *x, int32_t *y) {
    int per_group_out = op->out_c / op->groups, per_group_in = op->in_c / op->groups;
    int c, oy, ox, ic, ky, kx;
    for (c = 0; c < op->out_c; c++) {
        int g = c / per_group_out;
        for (oy = 0; oy < op->out_h; oy++) {
            for (ox = 0; ox < op->out_w; ox++) {
                int32_t acc = op->bias ? op->bias[c] : 0;  /* int32: |acc| <= proven bound < 2^31 */
                for (ic = 0; ic < per_group_in; ic++) {
                    for (ky = 0; ky < op->k_h; ky++) {
                        int iy = oy * op->stride_h - op->pad_h + ky * op->dil_h;
                        if (iy < 0 || iy >= op->in_h) continue;  /* padding: q - z = 0 */
                        for (kx = 0; kx < op->k_w; kx++) {
                            int ix = ox * op->stride_w - op->pad_w + kx * op->dil_w;
                            int32_t q, w;
                            if (ix < 0 || ix >= op->in_w) continue;
                            q = x[((g * per_group_in + ic) * op->in_h + iy) * op->in_w + ix] - op->input_zero;
                            w = op->weight[((c * per_group_in + ic) * op->k_h + ky) * op->k_w + kx];
                            acc += w * q;
                        }
                    }
                }
                y[(c * op->out_h + oy) * op->out_w + ox] =
                    intq_requantize(acc, op->mantissa[c], op->shift[c], op->output_zero, op->lower, op->upper);
            }
        }
    }
}

static void linear(const intq_op *op, const int32_t *x, int32_t *y) {
    int c, k;
    for (c = 0; c < op->out_c; c++) {
        int32_t acc = op->bias ? op->bias[c] : 0;
        for (k = 0; k < op->in_c; k++) acc += op->weight[c * op->in_c + k] * (x[k] - op->input_zero);
        y[c] = intq_requantize(acc, op->mantissa[c], op->shift[c], op->output_zero, op->lower, op->upper);
    }
}

static void maxpool(const intq_op *op, const int32_t *x, int32_t *y) {
    int c, oy, ox, ky, kx;
    for (c = 0; c < op->out_c; c++)
        for (oy = 0; oy < op->out_h; oy++)
            for (ox = 0; ox < op->out_w; ox++) {
                int32_t best = INT32_MIN;
                for (ky = 0; ky < op->k_h; ky++)
                    for (kx = 0; kx < op->k_w; kx++) {
                        int iy = oy * op->stride_h - op->pad_h + ky, ix = ox * op->stride_w - op->pad_w + kx;
                        if (iy >= 0 && iy < op->in_h && ix >= 0 && ix < op->in_w) {
                            int32_t v = x[(c * op->in_h + iy) * op->in_w + ix];
                            if (v > best) best = v;
                        }
                    }
                y[(c * op->out_h + oy) * op->out_w + ox] = best;
            }
}

static long volume(int c, int h, int w) { return (long)c * h * w; }

/* The output extent a window of size k (dilation d) slides to over n values with stride s and pad p. */
static int window_fits(int n, int out, int k, int s, int p, int d) {
    return n >= 1 && out >= 1 && k >= 1 && s >= 1 && d >= 1 && p >= 0 && (long)(out - 1) * s + (long)d * (k - 1) + 1 <= (long)n + 2L * p;
}

/* A pool's output extent over n values (eq. 31): floor windows must fit inside the padded input; ceil_mode
 * ones may reach past it (the loop reads only the part inside) but must start inside the input or its left
 * padding, and be the ceil count: at most ceil((n + 2p - k) / s) + 1. */
static int pool_fits(int n, int out, int k, int s, int p, int ceil_mode) {
    if (!ceil_mode) return window_fits(n, out, k, s, p, 1);
    return n >= 1 && out >= 1 && k >= 1 && s >= 1 && p >= 0 && 2L * p <= k && (long)k <= (long)n + 2L * p &&
           (long)(out - 1) * s < (long)n + p && (long)(out - 1) * s + k <= (long)n + 2L * p + s - 1;
}

/* q_y = table[q_x - table_first] (eq. 29). Every input code of the producer's type has an entry; an
 * integer outside the type reads the nearest end, so no input can index outside the table. */
static void lookup(const intq_op *op, const int32_t *x, int32_t *y) {
    long n, i;
    for (n = 0; n < volume(op->out_c, op->out_h, op->out_w); n++) {
        i = (long)x[n] - op->table_first;
        y[n] = op->table[i < 0 ? 0 : i >= op->table_count ? op->table_count - 1 : i];
    }
}

static int shift_ok(const intq_op *op) {
    long i;
    for (i = 0; i < op->multiplier_count; i++)
        if (op->mantissa[i] < 0 || op->shift[i] < -31 || op->shift[i] > 31) return 0;
    return 1;
}

/* A concatenation: >= 2 earlier sources, one multiplier each, each source's buffer exactly its
 * channels times the output plane, the channels summing to out_c. */
static int concat_ok(const intq_op *op, int index, const int32_t *sizes, long input_size) {
    long k, channels = 0, plane = (long)op->out_h * op->out_w;
    if (!op->sources || !op->source_zeros || !op->source_channels || op->source_count < 2 ||
        op->multiplier_count != op->source_count || op->sources[0] != op->input)
        return 0;
    for (k = 0; k < op->source_count; k++) {
        int source = op->sources[k];
        if (source < -1 || source >= index || op->source_channels[k] < 1 ||
            (source < 0 ? input_size : sizes[source]) != op->source_channels[k] * plane)
            return 0;
        channels += op->source_channels[k];
    }
    return channels == op->out_c;
}

/* y[k] = x[indices[k]], plane by plane (eq. 33). */
static void gather(const intq_op *op, const int32_t *x, int32_t *y) {
    long k, n, plane = (long)op->out_h * op->out_w;
    for (k = 0; k < op->out_c; k++)
        for (n = 0; n < plane; n++) y[k * plane + n] = x[op->indices[k] * plane + n];
}

/* A gather: one index per output channel, each a channel of the input, the same plane. */
static int gather_ok(const intq_op *op) {
    long k;
    if (!op->indices || op->index_count != op->out_c || op->in_h != op->out_h || op->in_w != op->out_w) return 0;
    for (k = 0; k < op->index_count; k++)
        if (op->indices[k] < 0 || op->indices[k] >= op->in_c) return 0;
    return 1;
}

/* A product: an earlier second operand, one multiplier, both operands of out_c channels whose plane
 * is the output's or 1 x 1, the second operand's buffer exactly its shape. */
static int mul_ok(const intq_op *op, int index, const int32_t *sizes, long input_size) {
    long plane = (long)op->out_h * op->out_w;
    return op->input2 >= -1 && op->input2 < index && op->multiplier_count == 1 &&
           op->in_c == op->out_c && op->in2_c == op->out_c &&
           ((long)op->in_h * op->in_w == 1 || (op->in_h == op->out_h && op->in_w == op->out_w)) &&
           ((long)op->in2_h * op->in2_w == 1 || (op->in2_h == op->out_h && op->in2_w == op->out_w)) &&
           (op->input2 < 0 ? input_size : sizes[op->input2]) == volume(op->in2_c, op->in2_h, op->in2_w) && plane >= 1;
}

static int op_ok(const intq_op *op, int index, const int32_t *sizes, long input_size) {
    long in_size = op->input < 0 ? input_size : sizes[op->input], out_size = volume(op->out_c, op->out_h, op->out_w);
    if (op->input < -1 || op->input >= index || in_size != volume(op->in_c, op->in_h, op->in_w) || out_size != sizes[index])
        return 0;
    if (op->mantissa && !shift_ok(op)) return 0;
    switch (op->kind) {
    case INTQ_CONV2D:
        return op->groups >= 1 && op->in_c % op->groups == 0 && op->out_c % op->groups == 0 &&
               op->weight_count == (long)op->out_c * (op->in_c / op->groups) * op->k_h * op->k_w &&
               (!op->bias || op->bias_count == op->out_c) && op->multiplier_count == op->out_c &&
               window_fits(op->in_h, op->out_h, op->k_h, op->stride_h, op->pad_h, op->dil_h) &&
               window_fits(op->in_w, op->out_w, op->k_w, op->stride_w, op->pad_w, op->dil_w);
    case INTQ_LINEAR:
        return op->in_h == 1 && op->in_w == 1 && op->out_h == 1 && op->out_w == 1 &&
               op->weight_count == (long)op->out_c * op->in_c && (!op->bias || op->bias_count == op->out_c) &&
               op->multiplier_count == op->out_c;
    case INTQ_MAXPOOL:
        return op->out_c == op->in_c && pool_fits(op->in_h, op->out_h, op->k_h, op->stride_h, op->pad_h, op->ceil_mode) &&
               pool_fits(op->in_w, op->out_w, op->k_w, op->stride_w, op->pad_w, op->ceil_mode);
    case INTQ_AVGPOOL:
        return op->out_c == op->in_c && op->multiplier_count == 1 && op->pad_h == 0 && op->pad_w == 0 &&
               window_fits(op->in_h, op->out_h, op->k_h, op->stride_h, 0, 1) &&
               window_fits(op->in_w, op->out_w, op->k_w, op->stride_w, 0, 1);
    case INTQ_ADD:
        return op->input2 >= -1 && op->input2 < index && op->multiplier_count == 3 && out_size == in_size &&
               (op->input2 < 0 ? input_size : sizes[op->input2]) == out_size;
    case INTQ_FLATTEN:
    case INTQ_RELU:
        return out_size == in_size;
    case INTQ_LOOKUP:
        return out_size == in_size && op->table != 0 && op->table_count >= 1 && op->table_count <= 256;
    case INTQ_CONCAT:
        return concat_ok(op, index, sizes, input_size);
    case INTQ_GATHER:
        return gather_ok(op);
    case INTQ_MUL:
        return mul_ok(op, index, sizes, input_size);
    }
    return 0;
}

int intq_check(const intq_op *ops, int count, const int32_t *buffer_sizes, long input_size) {
    int i;
    for (i = 0; i < count; i++)
        if (!op_ok(&ops[i], i, buffer_sizes, input_size)) return i;
    return -1;
}

/* Runs ops in order; buffers[i] receives op i's output (sized by the generated model.h); run
 * intq_check once first. */
void intq_run(const intq_op *ops, int count, const int32_t *input, int32_t **buffers) {
    int i, n;
    for (i = 0; i < count; i++) {
        const intq_op *op = &ops[i];
        const int32_t *x = op->input < 0 ? input : buffers[op->input];
        int32_t *y = buffers[i];
        switch (op->kind) {
        case INTQ_CONV2D: conv2d(op, x, y); break;
        case INTQ_LINEAR: linear(op, x, y); break;
        case INTQ_MAXPOOL: maxpool(op, x, y); break;
        case INTQ_ADD: add(op, x, op->input2 < 0 ? input : buffers[op->input2], y); break;
        case INTQ_AVGPOOL: avgpool(op, x, y); break;
        case INTQ_LOOKUP: lookup(op, x, y); break;
        case INTQ_CONCAT: concat(op, input, buffers, y); break;
        case INTQ_GATHER: gather(op, x, y); break;
        case INTQ_MUL: mul(op, x, op->input2 < 0 ? input : buffers[op->input2], y); break;
        case INTQ_FLATTEN:
        case INTQ_RELU:  /* flatten copies; relu clamps at the zero point */
            for (n = 0; n < op->out_c * op->out_h * op->out_w; n++)
                y[n] = op->kind == INTQ_RELU && x[n] < op->lower ? op->lower : x[n];
            break;
        }
    }
}
