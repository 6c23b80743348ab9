/* intq C99 runtime: integer-only inference of an intq IntegerModel (generated model.h).
 * Every value is an integer; the only wide type is int64_t for the requantization product.
 * Arithmetic contract: docs/math.md eq. 7-11, 17, 18, 29, 30, 31, 32, 33, 34. Rounding: half away from zero.
 * intq_check verifies, before anything runs, that every index an op will compute stays inside the
 * arrays and buffers it names (their lengths are in the op table), so a wrong table is refused
 * instead of read out of bounds. */
#ifndef INTQ_RUNTIME_H
#define INTQ_RUNTIME_H
#include <stdint.h>

typedef enum {
    INTQ_CONV2D = 0,
    INTQ_LINEAR = 1,
    INTQ_MAXPOOL = 2,
    INTQ_FLATTEN = 3,
    INTQ_RELU = 4,
    INTQ_ADD = 5,
    INTQ_AVGPOOL = 6,
    INTQ_LOOKUP = 7,
    INTQ_CONCAT = 8,
    INTQ_GATHER = 9,
    INTQ_MUL = 10
} intq_kind;

typedef struct {
    intq_kind kind;
    int input;                /* index of the input buffer (-1: the model input) */
    int input2;               /* add, mul: index of the second operand's buffer (-1: the model input) */
    int in_c, in_h, in_w;     /* input shape (linear: in_c = features, in_h = in_w = 1) */
    int out_c, out_h, out_w;  /* output shape */
    int in2_c, in2_h, in2_w;  /* mul: the second operand's shape (each operand's plane out_h x out_w or 1 x 1) */
    int k_h, k_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
    int ceil_mode;            /* maxpool: 1 for PyTorch's ceil_mode output size (eq. 31), the last windows clipped */
    const int8_t *weight;     /* (out_c, in_c/groups, k_h, k_w) or (out_c, in_c) */
    long weight_count;
    const int32_t *bias;      /* out_c values, or 0 */
    long bias_count;
    const int32_t *mantissa;  /* per output channel: M0 in [2^30, 2^31) (0: multiplier rounds to 0); */
    const int32_t *shift;     /* n, M = M0 * 2^-(31 + n). add: [operand a, operand b, output]; avgpool, mul: [output] */
    long multiplier_count;
    int32_t input_zero, input2_zero, output_zero, lower, upper;  /* lower = output_zero under a fused ReLU */
    const int32_t *table;     /* lookup: the output code of every input code (eq. 29), or 0 */
    long table_count;         /* 2^b entries for a b-bit input */
    int32_t table_first;      /* lookup: the input code of table[0], the input type's qmin */
    const int32_t *sources;   /* concat: each input's buffer index (-1: the model input), or 0 */
    const int32_t *source_zeros;     /* concat: each input's zero point */
    const int32_t *source_channels;  /* concat: each input's channels (same in_h, in_w), summing to out_c */
    long source_count;        /* concat: how many inputs (>= 2); one multiplier each */
    const int32_t *indices;   /* gather: output channel k is input channel indices[k] (eq. 33), or 0 */
    long index_count;         /* gather: out_c */
} intq_op;

int64_t intq_multiply(int64_t value, int32_t mantissa, int32_t shift);
int32_t intq_requantize(int64_t acc, int32_t mantissa, int32_t shift, int32_t zero, int32_t lower, int32_t upper);
/* -1 when every op's indices stay inside its arrays and buffers, else the index of the first op that fails. */
int intq_check(const intq_op *ops, int count, const int32_t *buffer_sizes, long input_size);
void intq_run(const intq_op *ops, int count, const int32_t *input, int32_t **buffers);
#endif
