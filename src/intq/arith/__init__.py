"""The integer arithmetic: the affine mapping (qparams), fixed-point requantization, sub-byte packing."""
