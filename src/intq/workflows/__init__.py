"""What the commands compute: the one pipeline, the study, sweep, sensitivity, inspect, checkpoints, compare, explain, costs."""
