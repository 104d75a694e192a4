"""The Flower ClientApp: the device's side of fedge (training, evaluation, check-in)."""
