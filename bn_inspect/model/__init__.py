"""Model file or --arch spec -> nn.Module, safely; which modules are normalization layers."""
