/* intq C99 runtime: integer-only inference of an intq IntegerModel (generated model.h).
 * Every value is an integer; the only wide type is int64_t for the requantization product.
 * Arithmetic contract: docs/math.md eq. 7-11. Rounding: half away from zero. */
#ifndef INTQ_RUNTIME_H
#define INTQ_RUNTIME_H
#include <stdint.h>

typedef struct {
    int kind;                 /* 0 conv2d, 1 linear, 2 maxpool, 3 flatten, 4 relu, 5 add, 6 avgpool */
    int input;                /* index of the input buffer (-1: the model input) */
    int in_c, in_h, in_w;     /* input shape (linear: in_c = features, in_h = in_w = 1) */
    int out_c, out_h, out_w;  /* output shape */
    int k_h, k_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
    const int8_t *weight;     /* (out_c, in_c/groups, k_h, k_w) or (out_c, in_c) */
    const int32_t *bias;      /* out_c values, or 0 */
    const int32_t *mantissa;  /* per output channel: M0 in [2^30, 2^31) (0: multiplier rounds to 0); */
    const int32_t *shift;     /* n, M = M0 * 2^-(31 + n). add: [operand a, operand b, output]; avgpool: [output] */
    int32_t input_zero, output_zero, lower, upper;  /* lower = output_zero under a fused ReLU */
    int input2;               /* add: index of the second operand's buffer (-1: the model input) */
    int32_t input2_zero;      /* add: the second operand's zero point */
} intq_op;

int64_t intq_multiply(int64_t value, int32_t mantissa, int32_t shift);
int32_t intq_requantize(int64_t acc, int32_t mantissa, int32_t shift, int32_t zero, int32_t lower, int32_t upper);
void intq_run(const intq_op *ops, int count, const int32_t *input, int32_t **buffers);
#endif
