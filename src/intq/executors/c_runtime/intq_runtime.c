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

/* Runs ops in order; buffers[i] receives op i's output (sized by the generated model.h). */
void intq_run(const intq_op *ops, int count, const int32_t *input, int32_t **buffers) {
    int i, n;
    for (i = 0; i < count; i++) {
        const intq_op *op = &ops[i];
        const int32_t *x = op->input < 0 ? input : buffers[op->input];
        int32_t *y = buffers[i];
        switch (op->kind) {
        case 0: conv2d(op, x, y); break;
        case 1: linear(op, x, y); break;
        case 2: maxpool(op, x, y); break;
        case 5: add(op, x, op->input2 < 0 ? input : buffers[op->input2], y); break;
        case 6: avgpool(op, x, y); break;
        default:  /* flatten copies; relu clamps at the zero point */
            for (n = 0; n < op->out_c * op->out_h * op->out_w; n++)
                y[n] = op->kind == 4 && x[n] < op->lower ? op->lower : x[n];
        }
    }
}
