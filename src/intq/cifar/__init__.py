"""CIFAR-10 data (layouts, decoding, the checked cache), the study's networks and ResNet-20, and training them."""
