/* Runs the golden images through the exported model and checks every op's output, value by value. */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"
#include "golden.h"

int main(void) {
    int32_t *buffers[INTQ_OP_COUNT];
    static int32_t input[INTQ_INPUT_SIZE]; /* static: a 3x224x224 image is 600 KB */
    int image, op, i;
    long compared = 0;
    int bad = intq_check(INTQ_OPS, INTQ_OP_COUNT, INTQ_BUFFER_SIZES, INTQ_INPUT_SIZE);
    if (bad >= 0) { printf("op %d of model.h fails the runtime's shape and length check\n", bad); return 3; }
    for (op = 0; op < INTQ_OP_COUNT; op++) {
        buffers[op] = malloc(sizeof(int32_t) * (size_t)INTQ_BUFFER_SIZES[op]);
        if (!buffers[op]) { printf("out of memory\n"); return 2; }
    }
    for (image = 0; image < GOLDEN_IMAGES; image++) {
        for (i = 0; i < INTQ_INPUT_SIZE; i++) input[i] = INTQ_INPUT_LUT[(i / INTQ_INPUT_PLANE) * 256 + GOLDEN_PIXELS[image * INTQ_INPUT_SIZE + i]];
        intq_run(INTQ_OPS, INTQ_OP_COUNT, input, buffers);
        for (op = 0; op < INTQ_OP_COUNT; op++) {
            const int32_t *expected = GOLDEN_OPS[op] + (long)image * INTQ_BUFFER_SIZES[op];
            for (i = 0; i < INTQ_BUFFER_SIZES[op]; i++, compared++) {
                if (buffers[op][i] != expected[i]) {
                    printf("MISMATCH image %d op %d value %d: got %d, expected %d\n", image, op, i,
                           (int)buffers[op][i], (int)expected[i]);
                    return 1;
                }
            }
        }
    }
    printf("OK %d images, %ld values bit-exact; output op %d\n", GOLDEN_IMAGES, compared, INTQ_OUTPUT_OP);
    return 0;
}
