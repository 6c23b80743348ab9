"""The model as intq sees it: the captured float graph, the QConfig, conversion to the IntegerModel, its file and its rules."""
