"""FedPAC on Flower: a tiny ViT trained from scratch on MNIST-5k (or synthetic images)."""
