/* Reads N images of uint8 pixels from pixels.bin, runs the exported model on each and writes the
 * output op's integers (int32, little-endian host order) to outputs.bin. Usage: ./verify N */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

int main(int argc, char **argv) {
    int32_t *buffers[INTQ_OP_COUNT];
    static int32_t input[INTQ_INPUT_SIZE]; /* static: a 3x224x224 image is 600 KB */
    static unsigned char pixels[INTQ_INPUT_SIZE];
    long images = argc > 1 ? atol(argv[1]) : 0, image;
    int op, i;
    FILE *in = fopen("pixels.bin", "rb"), *out = fopen("outputs.bin", "wb");
    if (!in || !out) { fprintf(stderr, "cannot open pixels.bin / outputs.bin\n"); return 2; }
    int bad = intq_check(INTQ_OPS, INTQ_OP_COUNT, INTQ_BUFFER_SIZES, INTQ_INPUT_SIZE);
    if (bad >= 0) { fprintf(stderr, "op %d of model.h fails the runtime's shape and length check\n", bad); return 3; }
    for (op = 0; op < INTQ_OP_COUNT; op++) {
        buffers[op] = malloc(sizeof(int32_t) * (size_t)INTQ_BUFFER_SIZES[op]);
        if (!buffers[op]) { fprintf(stderr, "out of memory\n"); return 2; }
    }
    for (image = 0; image < images; image++) {
        if (fread(pixels, 1, INTQ_INPUT_SIZE, in) != INTQ_INPUT_SIZE) { fprintf(stderr, "short read\n"); return 2; }
        for (i = 0; i < INTQ_INPUT_SIZE; i++) input[i] = INTQ_INPUT_LUT[(i / INTQ_INPUT_PLANE) * 256 + pixels[i]];
        intq_run(INTQ_OPS, INTQ_OP_COUNT, input, buffers);
        fwrite(buffers[INTQ_OUTPUT_OP], sizeof(int32_t), (size_t)INTQ_BUFFER_SIZES[INTQ_OUTPUT_OP], out);
    }
    fclose(in);
    fclose(out);
    return 0;
}
