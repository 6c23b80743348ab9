"""Image data that is not CIFAR-10 specific: the checked Dataset, a user's image folder, the decoded-array cache."""
