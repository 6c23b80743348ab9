"""Post-training methods beyond rounding to nearest: cross-layer equalization of the float graph (equalization),
learned rounding (adaround per layer, reconstruction per layer or block)."""
